"""The GPU step's Triton kernels (`fused_kernels`), run here in Triton's interpreter on CPU tensors (the same
kernel code a GPU compiles), against the eager ops they replace; and compiled ahead of time for the H100
and the DGX Spark's GB10, which needs no GPU."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tts_service import frame_step as fs
from tts_service import fused_kernels as fk
from tts_service.sampling import Draws, SamplerPlan, choose_among_top, gumbel_noise

pytest.importorskip("triton")  # torch's Linux wheels require it; elsewhere the step runs without these kernels

HEADS, KV_HEADS, D = 4, 2, 16


def qwen_tts_q_k(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """qwen-tts's q/k norm (Qwen3's RMSNorm) and apply_rotary_pos_emb, op by op; x [..., heads, D], cos/sin
    [..., 1, D] (sin as the model's, not sign-flipped)."""
    x32 = x.float()
    normed = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    half = D // 2
    rotated = torch.cat((-normed[..., half:], normed[..., :half]), dim=-1)
    return normed * cos + rotated * sin


def case(dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    width = (HEADS + 2 * KV_HEADS) * D
    qkv = rand(3 * 2, width + 8)[:, :width]  # rows with a longer stride, as a padded product's slice
    weight = rand(HEADS + KV_HEADS, D)
    cos, model_sin = rand(12, D), rand(12, D)
    sin = torch.cat([-model_sin[:, : D // 2], model_sin[:, D // 2 :]], dim=-1)  # as Stack.sin
    return qkv, weight, cos, model_sin, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("positions", "slots"), [(None, None), ([0, 4, 9], None), (None, [4, 0, 2])])
def test_the_qk_kernel_gives_qwen_tts_values_and_writes_both_caches(dtype: torch.dtype, positions, slots) -> None:
    """Two tokens per row (the code predictor's first step); per-row positions (the talker's) or none; each
    row's cache slot its own (a prefill's) or the row. bf16 is checked against the float32 values within a few
    bf16 steps: Triton's interpreter truncates where a GPU rounds to nearest, so qwen-tts's bf16 bits are a GPU
    measurement (the kit's first divergent frame)."""
    qkv, weight, cos, model_sin, sin = case(dtype)
    at = None if positions is None else torch.tensor(positions)
    slot_of = [0, 1, 2] if slots is None else slots
    keys = torch.full((5, KV_HEADS, 12, D), 7.0, dtype=dtype)
    values = keys.clone()
    q = fk.qk_norm_rope_into_cache(
        qkv,
        2,
        weight,
        cos,
        sin,
        at,
        1,
        keys,
        values,
        HEADS,
        KV_HEADS,
        1e-6,
        None if slots is None else torch.tensor(slots),
    )
    assert q.shape == (3, HEADS, 2, D)

    x = qkv.reshape(3, 2, HEADS + 2 * KV_HEADS, D)
    place = (torch.arange(2)[None, :] + 1 + (0 if at is None else at[:, None])).expand(3, 2)  # [row, token]
    tables = cos.float()[place][:, :, None], model_sin.float()[place][:, :, None]
    expected = qwen_tts_q_k(x[:, :, : HEADS + KV_HEADS].float(), weight.float(), *tables)
    steps = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps  # float32: op order; bf16: roundings
    tolerance = {"rtol": steps, "atol": steps * expected.abs().max().item()}
    torch.testing.assert_close(q.transpose(1, 2).float(), expected[:, :, :HEADS], **tolerance)
    written = torch.zeros(5, 12, dtype=torch.bool)
    for row, slot in enumerate(slot_of):
        for token in range(2):
            p = int(place[row, token])
            written[slot, p] = True
            torch.testing.assert_close(keys[slot, :, p].float(), expected[row, token, HEADS:], **tolerance)
            assert torch.equal(values[slot, :, p], x[row, token, HEADS + KV_HEADS :])
    untouched = ~written[:, None, :, None].expand_as(keys)
    assert bool((keys[untouched] == 7).all() and (values[untouched] == 7).all())  # nothing else written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rms_norm_kernel_gives_qwen_tts_values(dtype: torch.dtype) -> None:
    """Against qwen-tts's own module (`Qwen3TTSRMSNorm`), at a width that is not a power of 2, rows with a
    longer stride; float32 within its op order, bf16 within a few steps (the interpreter truncates)."""
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSRMSNorm

    width = 96
    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(5, width + 7, generator=generator) * 3).to(dtype)[:, :width]
    module = Qwen3TTSRMSNorm(width, eps=1e-6).to(dtype)
    module.weight.data = (1 + torch.randn(width, generator=generator) / 4).to(dtype)
    expected = module(x).float()
    steps = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    got = fk.rms_norm(x, module.weight.detach(), 1e-6, 5)
    torch.testing.assert_close(got.float(), expected, rtol=steps, atol=steps * expected.abs().max().item())
    with pytest.raises(ValueError, match="rms_norm"):
        fk.rms_norm(x, module.weight.detach()[:-1], 1e-6, 5)


def _torch_cuda_sum(values: np.ndarray, vector: int, threads: int) -> np.float32:
    """The order in which torch's CUDA reduction kernel adds a contiguous float32 row (ATen's Reduce.cuh:
    `input_vectorized_thread_reduce_impl` or `thread_reduce_impl` with four accumulators, then
    `block_x_reduce`), transcribed thread by thread in float32: the oracle for `_sum_of_squares`."""
    width, zero = len(values), np.float32(0)
    sums = []
    for t in range(threads):
        acc = [zero] * 4
        idx = t
        if vector > 1:
            while idx * vector + vector - 1 < width:
                acc = [acc[i] + values[idx * vector + i] for i in range(4)]
                idx += threads
        else:
            while idx + 3 * threads < width:
                acc = [acc[i] + values[idx + i * threads] for i in range(4)]
                idx += 4 * threads
            for i in range(4):  # the tail
                if idx >= width:
                    break
                acc[i] = acc[i] + values[idx]
                idx += threads
        sums.append(((acc[0] + acc[1]) + acc[2]) + acc[3])
    lanes, offset = threads, threads // 2
    while lanes > 32 and offset >= 32:  # shared memory: thread t adds thread t + offset
        sums = [sums[t] + sums[t + offset] for t in range(offset)]
        offset //= 2
    lanes = min(lanes, 32)
    offset = 1
    while offset < lanes:  # the warp's shuffles down: lane t adds lane t + offset
        sums = [sums[t] + sums[t + offset] if t + offset < lanes else sums[t] for t in range(lanes)]
        offset *= 2
    return sums[0]


@pytest.mark.parametrize(
    ("width", "tokens", "layout"),
    [(2048, 1, (4, 512)), (2048, 3, (4, 256)), (2048, 16, (4, 32)), (1024, 2, (4, 256)), (160, 1, (4, 32))]
    + [(96, 4, (1, 64)), (128, 16, (1, 32))],
)
def test_the_rms_norm_kernel_sums_in_torchs_cuda_order(width: int, tokens: int, layout: tuple[int, int]) -> None:
    """torch's order of sums for a lone request's call (`torch_sum_layout`), against Reduce.cuh transcribed
    (`_torch_cuda_sum`): float32 RMSNorm values equal, bit for bit. Widths whose rows are loaded 4 values
    at a time and one at a time, and rows that some threads read less of than others."""
    assert fk.torch_sum_layout(width, tokens) == layout
    generator = torch.Generator().manual_seed(width + tokens)
    x = torch.randn(8, width, generator=generator) * 3
    weight = 1 + torch.randn(width, generator=generator) / 4
    got = fk.rms_norm(x, weight, 1e-6, tokens)
    factor = np.float32(1) / np.float32(width)  # torch's mean: the sum times 1 / width
    for row, out in zip(x.numpy(), got, strict=True):
        mean = _torch_cuda_sum(row * row, *layout) * factor
        scale = np.float32(1) / np.sqrt(mean + np.float32(1e-6))
        assert torch.equal(out, weight * (torch.from_numpy(row) * torch.tensor(scale)))
    if layout[0] > 1:  # the order matters: another layout's sums part from these in about a fifth of rows
        other = (layout[0], 512 if layout[1] == 32 else 32)
        rows = (torch.randn(64, width, generator=generator) * 3).numpy()
        assert any(_torch_cuda_sum(row * row, *other) != _torch_cuda_sum(row * row, *layout) for row in rows)


def test_the_cuda_kernels_keep_their_constexpr_parameters() -> None:
    """`_kernel` builds each CUDA kernel from a copy of its function (to bind `_sum_of_squares`); Triton
    reads which parameters are compile-time constants from the annotations, so the copy keeps them. Without
    them a GPU launch would fail to compile (tl.arange of a runtime BLOCK) and `usable` would turn every
    kernel off; the compile test cannot see it, since it gives its own signature."""
    import triton

    for name, fn in fk._KERNELS.items():
        kernel = fk._kernel(name, "cuda")
        assert [(p.name, p.is_constexpr) for p in kernel.params] == [
            (p.name, p.is_constexpr) for p in triton.jit(fn).params
        ]
        assert any(p.is_constexpr for p in kernel.params)
        assert (
            kernel.do_not_specialize
            == triton.jit(fn, do_not_specialize=fk.NOT_SPECIALIZED.get(name, ())).do_not_specialize
        )


def test_a_layout_torch_would_sum_otherwise_is_refused() -> None:
    """Rows that start unaligned (torch shifts its vector loads) and rows whose sum torch splits across warps
    (from 16 values a thread per warp in the block) are outside the transcription: refused, so `usable`
    turns the kernels off. One row of 8,192 is split across a block of one warp's height: the same order."""
    with pytest.raises(ValueError, match="unaligned"):
        fk.torch_sum_layout(130, 1)
    with pytest.raises(ValueError, match="across warps"):
        fk.torch_sum_layout(8192, 2)
    assert fk.torch_sum_layout(8192, 1) == (4, 512)


def test_the_q_k_kernel_sums_in_torchs_cuda_order() -> None:
    """The q and k norms' sums in torch's order for a lone request: 16 q heads of 128 a token, and 8 k heads,
    which torch sums over 64 threads for one token (8 rows) and 32 for two (16): float32 q and k equal the
    eager ops with Reduce.cuh's order (`_torch_cuda_sum`), bit for bit."""
    heads, kv_heads, d = 16, 8, 128
    generator = torch.Generator().manual_seed(11)
    weight = 1 + torch.randn(heads + kv_heads, d, generator=generator) / 4
    angles = torch.arange(8)[:, None] / 1e6 ** (torch.arange(0, d, 2) / d)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    flipped = torch.cat([-sin[:, : d // 2], sin[:, d // 2 :]], dim=-1)
    for tokens, k_layout in ((1, (1, 64)), (2, (1, 32))):
        assert fk.torch_sum_layout(d, tokens * heads) == (1, 32)
        assert fk.torch_sum_layout(d, tokens * kv_heads) == k_layout
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=generator) * 2
        keys, values = torch.zeros(1, kv_heads, 8, d), torch.zeros(1, kv_heads, 8, d)
        q = fk.qk_norm_rope_into_cache(qkv, tokens, weight, cos, flipped, None, 0, keys, values, heads, kv_heads, 1e-6)
        got = torch.cat([q[0].transpose(0, 1), keys[0, :, :tokens].transpose(0, 1)], dim=1)  # [tokens, 24, d]
        x = qkv.view(tokens, -1, d)[:, : heads + kv_heads]
        for token in range(tokens):
            for head in range(heads + kv_heads):
                row = x[token, head].numpy()
                layout = (1, 32) if head < heads else k_layout
                scale = np.float32(1) / np.sqrt(
                    _torch_cuda_sum(row * row, *layout) * np.float32(1 / d) + np.float32(1e-6)
                )
                normed = weight[head] * (x[token, head] * torch.tensor(scale))
                expected = normed * cos[token] + normed.roll(d // 2) * flipped[token]
                assert torch.equal(got[token, head], expected), (token, head)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_silu_mul_kernel_gives_torchs_values(dtype: torch.dtype) -> None:
    """A width that is not a multiple of the kernel's block; rows with a longer stride."""
    width = fk.SILU_BLOCK + 37
    gate_up = torch.randn(3, 2 * width + 5, generator=torch.Generator().manual_seed(1)).to(dtype)[:, : 2 * width]
    gate, up = gate_up.float().split(width, dim=-1)
    steps = 1e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(fk.silu_mul(gate_up).float(), F.silu(gate) * up, rtol=steps, atol=steps)


@pytest.mark.parametrize("vocab", [2048, 3072])  # the code predictor's, the talker's (not a power of 2)
def test_the_sampling_kernel_draws_choose_among_tops_token(vocab: int) -> None:
    """Per-row temperature and top-k (0 and past the candidates clamp to 1 and to them), greedy and sampling
    rows, suppressed ids (-inf), with greedy rows on and off: the same token as `choose_among_top`."""
    generator = torch.Generator().manual_seed(vocab)
    rows = 6
    temperature = torch.tensor([0.9, 1.0, 0.5, 1.3, 0.9, 2.0])
    top_k = torch.tensor([50, 1, 10, 50, 0, 70])
    do_sample = torch.tensor([True, True, False, True, True, False])
    for trial in range(8):
        logits = torch.randn(rows, vocab, generator=generator) * 3
        if trial % 2:
            logits[:, vocab - 1024 :] = float("-inf")
        noise = gumbel_noise(torch.rand(rows, 3072, generator=generator))  # as frame_noise: the widest vocabulary
        for greedy_rows in (True, False):
            plan = SamplerPlan(candidates=60, top_p=False, greedy_rows=greedy_rows)
            settings = (do_sample, temperature, top_k, torch.ones(rows))
            expected = choose_among_top(logits, *settings, Draws(noise=noise), torch.empty(0), plan)
            got = fk.sample_top_k(logits, noise, temperature, top_k, do_sample, plan.candidates, greedy_rows)
            assert torch.equal(got, expected), (trial, greedy_rows, got, expected)


def attention_case(dtype: torch.dtype, heads: int, kv_heads: int, slots: int = 5, seed: int = 0):
    """q [4, heads, 1, D] as the q/k kernel lays it out (rows' heads contiguous) and a cache of `slots` slots
    of two splits and a bit, rows at positions within the first split, at a split's last and first keys,
    and at the cache's end."""
    generator = torch.Generator().manual_seed(seed)
    length = 2 * fk.ATTENTION_SPLIT + 5
    q = torch.randn(4, 1, heads, D, generator=generator).to(dtype).transpose(1, 2)
    keys, values = (torch.randn(slots, kv_heads, length, D, generator=generator).to(dtype) for _ in "kv")
    positions = torch.tensor([3, fk.ATTENTION_SPLIT - 1, fk.ATTENTION_SPLIT, length - 1])
    return q, keys, values, positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(HEADS, KV_HEADS), (4, 4), (8, 2)])
def test_the_decode_attention_kernel_attends_each_rows_live_keys_only(dtype: torch.dtype, heads, kv_heads) -> None:
    """softmax(q k / sqrt(D)) v over keys 0 to the row's position, query head h reading KV head h // group
    (qwen-tts's repeat_kv), in float64 from the same inputs. Every key past a row's position, and every slot
    past the rows, is NaN: had the kernel read one (even at zero weight), the row's output would be NaN."""
    q, keys, values, positions = attention_case(dtype, heads, kv_heads)
    for row, position in enumerate(positions.tolist()):
        keys[row, :, position + 1 :] = float("nan")
        values[row, :, position + 1 :] = float("nan")
    keys[len(positions) :], values[len(positions) :] = float("nan"), float("nan")
    got = fk.decode_attention(q, keys, values, positions, D**-0.5)
    assert got.shape == q.shape and got.dtype == dtype
    assert not got.isnan().any()
    for row, position in enumerate(positions.tolist()):
        k, v = (t[row, :, : position + 1].double().repeat_interleave(heads // kv_heads, 0) for t in (keys, values))
        expected = torch.softmax(q[row].double() @ k.transpose(-1, -2) * D**-0.5, dim=-1) @ v
        tolerance = 1e-6 if dtype == torch.float32 else 2**-8  # float32 throughout, rounded once to bf16
        np.testing.assert_allclose(got[row].double(), expected, rtol=tolerance, atol=tolerance, err_msg=str(row))


def test_the_decode_attention_kernel_gives_a_row_the_same_bits_alone_and_among_others() -> None:
    """A row reads only its own slot, in a fixed order: the same bits alone (its cache in slot 0) as in a
    batch of rows of other lengths, so a seed replays whatever shares the step."""
    q, keys, values, positions = attention_case(torch.bfloat16, HEADS, KV_HEADS)
    together = fk.decode_attention(q, keys, values, positions, D**-0.5)
    for row in range(len(positions)):
        alone = fk.decode_attention(
            q[row : row + 1].contiguous(), keys[row : row + 1], values[row : row + 1], positions[row : row + 1], D**-0.5
        )
        assert torch.equal(alone[0], together[row]), row


@pytest.mark.parametrize("programs", [1, 2, 3])
def test_the_looped_decode_attention_gives_the_bits_of_one_program_a_split(monkeypatch, programs: int) -> None:
    """With `looped`, `programs` programs a row and KV head each loop over splits i, i + programs, ...: every
    split is computed as by its own program, so the output has the same bits. Rows end in the first split,
    at a split's edges, midway and at the cache's end (7 splits); every key past a row's position is NaN, so
    a loop that read past the live keys would show."""
    generator = torch.Generator().manual_seed(5)
    length = 6 * fk.ATTENTION_SPLIT + 5
    positions = torch.tensor([3, fk.ATTENTION_SPLIT - 1, fk.ATTENTION_SPLIT, 400, length - 1])
    q = torch.randn(5, 1, HEADS, D, generator=generator).transpose(1, 2)
    keys, values = (torch.randn(5, KV_HEADS, length, D, generator=generator) for _ in "kv")
    for row, position in enumerate(positions.tolist()):
        keys[row, :, position + 1 :], values[row, :, position + 1 :] = float("nan"), float("nan")
    one_a_split = fk.decode_attention(q, keys, values, positions, D**-0.5)
    assert fk.attention_programs(5, KV_HEADS, 7, torch.device("cpu")) < 7  # (the CPU's stand-in count loops)
    monkeypatch.setattr(fk, "attention_programs", lambda *args: programs)
    looped = fk.decode_attention(q, keys, values, positions, D**-0.5, looped=True)
    assert not one_a_split.isnan().any() and torch.equal(looped, one_a_split)


def test_attention_programs_fill_the_gpu_and_never_exceed_the_splits(monkeypatch) -> None:
    """Four split programs a multiprocessor (an H100's 132), at most one a split: a lone row keeps one a
    split, 32 rows of 8 KV heads get 3 programs each where one a split schedules 28."""
    monkeypatch.setattr(fk, "_multiprocessors", lambda device: 132)
    cuda = torch.device("cuda")
    got = {rows: fk.attention_programs(rows, 8, 28, cuda) for rows in (1, 2, 8, 32, 64, 256)}
    assert got == {1: 28, 2: 28, 8: 9, 32: 3, 64: 2, 256: 1}
    assert fk.attention_programs(1, 8, 2, cuda) == 2


def test_the_kernels_refuse_shapes_they_would_read_out_of_bounds() -> None:
    """The kernels index by offsets, unchecked; their wrappers check what the offsets assume."""
    qkv, weight, cos, _, sin = case(torch.float32)
    keys = torch.zeros(5, KV_HEADS, 12, D)
    values = keys.clone()
    arguments = {"qkv": qkv, "weight": weight, "keys": keys, "values": values, "positions": torch.tensor([0, 4, 9])}
    arguments["slots"] = torch.tensor([4, 0, 2])
    wrong = {
        "qkv": qkv[:, :-D],  # a head short
        "weight": weight[:-1],
        "keys/values": keys[:, :1],  # one KV head fewer than the model's
        "positions": torch.tensor([0, 4]),  # one position short of the rows
        "slots": torch.tensor([4, 0, 2, 1]),  # a slot more than the rows
    }
    for name, bad in wrong.items():
        given = dict(arguments, **{name.split("/")[0]: bad})
        with pytest.raises(ValueError, match=name):
            fk.qk_norm_rope_into_cache(
                given["qkv"], 2, given["weight"], cos, sin, given["positions"], 1, given["keys"], values, HEADS,
                KV_HEADS, 1e-6, given["slots"],
            )  # fmt: skip
    with pytest.raises(ValueError, match="gate_up"):
        fk.silu_mul(torch.zeros(3, 7))
    q, keys, values, positions = attention_case(torch.float32, HEADS, KV_HEADS)
    wrong_attention = {
        "q": {"q": torch.randn(4, D, HEADS, 1).permute(0, 2, 3, 1)},  # heads not contiguous rows
        "heads": {"q": torch.randn(4, 6, 1, D)},  # 6 query heads over 2 KV heads: a group of 3
        "keys/values": {"keys": keys[:3], "values": values[:3]},  # fewer slots than rows
        "positions": {"positions": positions[:3]},
    }
    for name, bad in wrong_attention.items():
        given = {"q": q, "keys": keys, "values": values, "positions": positions} | bad
        with pytest.raises(ValueError, match=name):
            fk.decode_attention(given["q"], given["keys"], given["values"], given["positions"], D**-0.5)


def test_usable_checks_the_kernels_against_the_eager_ops(engine, monkeypatch, caplog) -> None:
    """At the model's own sizes, in each of the step's call forms."""
    sizes, vocabularies = fs.sizes(engine.scheduler.weights), fs.vocabularies(engine.scheduler.weights)
    with caplog.at_level(logging.INFO, logger="tts_service.fused_kernels"):
        assert fk.usable(torch.device("cpu"), torch.bfloat16, sizes, vocabularies)
    assert "Triton kernels compiled and checked on cpu in" in caplog.text  # (the start-up log's compile time)
    caplog.clear()
    calls = []
    original = fk.qk_norm_rope_into_cache
    monkeypatch.setattr(fk, "qk_norm_rope_into_cache", lambda *a, **k: calls.append(a) or original(*a, **k))
    monkeypatch.setattr(fk, "silu_mul", lambda gate_up: torch.zeros_like(gate_up[:, : gate_up.shape[1] // 2]))
    with caplog.at_level(logging.WARNING, logger="tts_service.fused_kernels"):
        assert not fk.usable(torch.device("cpu"), torch.bfloat16, sizes, vocabularies)
    assert "without its Triton kernels" in caplog.text and "differ from the eager ops" in caplog.text
    # the talker's sizes were checked in each call form before the first SiLU-mul failed
    heads, kv_heads, head_dim, _, _ = sizes[0]
    assert {(c[1], c[5] is not None, c[6], c[12] is not None) for c in calls} == set(fk.STEP_CALLS)
    assert {tuple(c[2].shape) for c in calls} == {(heads + kv_heads, head_dim)}


def test_attention_usable_checks_the_decode_attention_over_live_keys(engine, monkeypatch, caplog) -> None:
    """At the talker's sizes, in a cache of the step's length; apart from `usable`, so a failure costs only
    the attention (the scheduler then keeps the layer kernels: test_step_engine)."""
    talker = fs.sizes(engine.scheduler.weights)[0]
    with caplog.at_level(logging.INFO, logger="tts_service.fused_kernels"):
        assert fk.attention_usable(torch.device("cpu"), torch.bfloat16, talker, 300)
    assert "Triton decode attention compiled and checked on cpu in" in caplog.text
    # float32 too, with the default settings' cache: an attention over 3,584 keys sums in another order
    assert fk.attention_usable(torch.device("cpu"), torch.float32, talker, 3584)
    caplog.clear()
    # a decode attention that reads past a row's live keys fails it, in a cache of the step's length
    attention, lengths = fk.decode_attention, []

    def past_the_live_keys(q, keys, values, positions, scale, looped=False):
        lengths.append(keys.shape[2])
        return attention(q, keys, values, torch.full_like(positions, keys.shape[2] - 1), scale, looped)

    monkeypatch.setattr(fk, "decode_attention", past_the_live_keys)
    with caplog.at_level(logging.WARNING, logger="tts_service.fused_kernels"):
        assert not fk.attention_usable(torch.device("cpu"), torch.bfloat16, talker, 300)
    assert (
        "attends with SDPA" in caplog.text and "differ from the eager ops" in caplog.text and lengths == [300, 300]
    )  # (the attention, then its looped form)


@pytest.mark.parametrize("arch", [90, 121])  # the H100, the DGX Spark's GB10
def test_the_kernels_compile_for_the_gpus_without_one(arch: int) -> None:
    """Triton compiles to PTX and ptxas to a cubin with no GPU present: the kernels' code is valid GPU code,
    with the instructions torch's kernels run (their SASS; scripts/kernel_instructions.py shows both)."""
    compiled = fk.compiled_for(arch)
    assert set(compiled) == set(fk._KERNELS) | {"qk_norm_rope_kv prefill", "rms_norm prefill"}
    for name, kernel in compiled.items():
        ptx = kernel.asm["ptx"]
        assert f".target sm_{arch}" in ptx and kernel.asm["cubin"]
        assert kernel.metadata.num_warps == {"qk": fk.QK_WARPS, "sa": fk.SAMPLE_WARPS}.get(name[:2], 4)
        assert "div.full" not in ptx  # IEEE division, as torch's `/`
        if name.startswith(("qk_norm_rope_kv", "rms_norm")):  # MUFU.RSQ, each product rounded
            assert "rsqrt.approx" in ptx and not re.search(r"\bsqrt\.approx", ptx)
            assert not re.search(r"\bfma\.rn\.(f32|bf16)", ptx)
        if name == "silu_mul":  # CUDA's expf: its range reduction's constant 12582913.0, one FMA with the 1 +
            assert "0f4B400001" in ptx and re.search(r"\bfma\.rn\.f32", ptx)


def test_the_step_names_its_kernel_forms(engine) -> None:
    w = engine.scheduler.weights
    assert fs.kernel_forms(fs.with_fewer_kernels(w, False)) == "qwen-tts's ops"
    assert "Triton" not in fs.kernel_forms(fs.with_fewer_kernels(w, True))
    assert "Triton" in fs.kernel_forms(fs.with_fewer_kernels(w, True, triton=True))
    assert "live keys" in fs.kernel_forms(fs.with_fewer_kernels(w, True, triton=True))
    assert "live keys" not in fs.kernel_forms(fs.with_fewer_kernels(w, True, triton=True, triton_attention=False))
    assert not fs.with_fewer_kernels(w, True, triton=False, triton_attention=True).talker.triton_attention
    assert "sampling" in fs.kernel_forms(fs.with_fewer_kernels(w, True, triton=True))
    assert "sampling" not in fs.kernel_forms(fs.with_fewer_kernels(w, True, triton=True, triton_sampling=False))
