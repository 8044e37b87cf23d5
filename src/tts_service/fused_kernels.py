"""Triton kernels that do in one launch what the frame step's layers do in several (GPU only).

Why: on a GPU the step is bound by kernel launches, not by arithmetic (issue 15; run 3: about 1.8 us a
kernel). Per layer and token, the eager step spends seven kernels between the QKV product and attention
(q/k RMSNorm, its per-head weight, RoPE's two products and sum, the K and V cache writes; a prefill's
writes go to each prompt's slot) and two on SiLU(gate) * up; a sampled token about ten.
`qk_norm_rope_into_cache`, `silu_mul` and `sample_top_k` are one kernel each. `rms_norm` is one kernel
like `F.rms_norm`, but rounds where qwen-tts's RMSNorm rounds. `decode_attention` (two kernels) reads each
row's live keys only, where SDPA inside a CUDA graph attends a fixed length under a mask.

They compute in float32 and round to the activations' dtype where qwen-tts's ops do: the normed value,
its product with the weight, RoPE's two products and their sum; SiLU, then its product with `up`. So on a
GPU (round to nearest) bf16 should give qwen-tts's values up to the order of the variance's sum, where one
rounding at the end would not. They also run the instructions torch's kernels run on sm_90 (read from
their SASS): `tl.rsqrt`, IEEE division, CUDA's expf in SiLU, and no fused multiply-add where torch rounds
a product first (`FP_FUSION`). Triton's interpreter truncates instead, so the CPU tests check bf16 within
a few steps and float32 within 1e-5; on a GPU, `bench_engine.py --kernel-forms` reports the share of
elements with qwen-tts's bits and the first frame where bf16 codes part.

On a CUDA tensor a kernel is compiled by Triton (torch's Linux wheels ship it); on a CPU tensor it runs
in Triton's interpreter, which is how the suite tests the same kernel code without a GPU (slow: tests
only). `usable` and `attention_usable` check at start-up that the kernels compile and agree with the
eager forms on the device, so a GPU Triton cannot serve (an unsupported architecture) falls back to the
eager step with a warning.
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Sequence
from functools import cache

import torch

from tts_service.sampling import Draws, SamplerPlan, choose_among_top, gumbel_noise

logger = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - torch's Linux wheels require triton
    triton = None


def _sum_of_squares(row_ptr, WIDTH: tl.constexpr, W: tl.constexpr, V: tl.constexpr):
    """A row's sum of squares in float32, added in the order of torch's CUDA reduction kernel (ATen's
    Reduce.cuh) for the layout `torch_sum_layout` gives: each of W threads adds its loads (V values each)
    into four accumulators (vector lane i; without vectors, load k % 4), then the four in order; then the
    threads' sums pairwise, halving down to 32 (shared memory), then a warp's tree of neighbours."""
    t = tl.arange(0, W)
    a0 = tl.full([W], 0.0, tl.float32)  # (tl.zeros is not in the interpreter)
    a1 = a0
    a2 = a0
    a3 = a0
    for k in tl.static_range((WIDTH // V + W - 1) // W):
        for i in tl.static_range(V):
            at = (k * W + t) * V + i
            x = tl.load(row_ptr + at, mask=at < WIDTH, other=0.0).to(tl.float32)
            slot = i if V > 1 else k % 4
            if slot == 0:
                a0 += x * x
            elif slot == 1:
                a1 += x * x
            elif slot == 2:
                a2 += x * x
            else:
                a3 += x * x
    s = ((a0 + a1) + a2) + a3
    for level in tl.static_range(4):  # thread t adds thread t + W / 2's sum, while more than a warp's are left
        if W >= 512 >> level:
            s = tl.reduce(tl.reshape(s, (2, 256 >> level)), 0, tl.standard._sum_combine)
    for level in tl.static_range(4):  # then the warp's shuffles at offsets 1, 2, 4, ...: neighbours first
        if W >= 32 >> level:
            s = tl.reduce(tl.reshape(s, (16 >> level, 2)), 1, tl.standard._sum_combine)
    return tl.reduce(s, 0, tl.standard._sum_combine)


def _qk_norm_rope_kv(
    qkv_ptr,
    qkv_row_stride,
    weight_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    pos_offset,
    slots_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    cache_slot_stride,
    cache_head_stride,
    cache_pos_stride,
    tokens,
    eps,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    VECTOR: tl.constexpr,
    Q_THREADS: tl.constexpr,
    K_THREADS: tl.constexpr,
):
    """One program per (token, head) of qkv rows [rows, (HEADS + 2 * KV_HEADS) * 2 * HALF]: a q head is
    normed, weighted, rotated and stored to q [rows, HEADS, D]; a k head the same, into the K cache at
    (slot, position); a v head is copied into the V cache there. slot = the row's `slots_ptr` entry
    (HAS_SLOTS) or the row (row = token // tokens); position = the row's `pos_ptr` entry (HAS_POS) +
    pos_offset + the token's index in its row. RoPE's tables are indexed by
    the same position; `sin` is sign-flipped on its first half (roll(x) * sin = rotate_half(x) * sin).
    VECTOR and Q_THREADS / K_THREADS: torch's layout for the q and k norms' sums (`torch_sum_layout`)."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    row = (token // tokens).to(tl.int64)  # (cache offsets can pass 2**31 with many long slots)
    position = token % tokens + pos_offset
    if HAS_POS:
        position += tl.load(pos_ptr + row)
    slot = row
    if HAS_SLOTS:
        slot = tl.load(slots_ptr + row).to(tl.int64)
    offs = tl.arange(0, HALF)
    src = qkv_ptr + token * qkv_row_stride + head * (2 * HALF)
    lo = tl.load(src + offs)
    hi = tl.load(src + HALF + offs)
    cache_at = slot * cache_slot_stride + position * cache_pos_stride + offs
    if head < HEADS + KV_HEADS:
        dtype = lo.dtype
        lo32 = lo.to(tl.float32)
        hi32 = hi.to(tl.float32)
        if head < HEADS:
            squares = _sum_of_squares(src, 2 * HALF, Q_THREADS, VECTOR)
        else:
            squares = _sum_of_squares(src, 2 * HALF, K_THREADS, VECTOR)
        scale = tl.rsqrt(squares * tl.math.div_rn(1.0, 2.0 * HALF) + eps)  # (see _rms_norm)
        w_lo = tl.load(weight_ptr + head * (2 * HALF) + offs).to(tl.float32)
        w_hi = tl.load(weight_ptr + head * (2 * HALF) + HALF + offs).to(tl.float32)
        # qwen-tts: weight * (x * rsqrt(var + eps)).to(dtype), each product rounded to the dtype
        n_lo = (w_lo * (lo32 * scale).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        n_hi = (w_hi * (hi32 * scale).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        table = position * (2 * HALF)
        c_lo = tl.load(cos_ptr + table + offs).to(tl.float32)
        c_hi = tl.load(cos_ptr + table + HALF + offs).to(tl.float32)
        s_lo = tl.load(sin_ptr + table + offs).to(tl.float32)
        s_hi = tl.load(sin_ptr + table + HALF + offs).to(tl.float32)
        # q * cos + rotate_half(q) * sin, each product and the sum rounded
        out_lo = ((n_lo * c_lo).to(dtype).to(tl.float32) + (n_hi * s_lo).to(dtype).to(tl.float32)).to(dtype)
        out_hi = ((n_hi * c_hi).to(dtype).to(tl.float32) + (n_lo * s_hi).to(dtype).to(tl.float32)).to(dtype)
        if head < HEADS:
            dst = q_ptr + (token * HEADS + head) * (2 * HALF) + offs
            tl.store(dst, out_lo)
            tl.store(dst + HALF, out_hi)
        else:
            dst = k_ptr + cache_at + (head - HEADS) * cache_head_stride
            tl.store(dst, out_lo)
            tl.store(dst + HALF, out_hi)
    else:
        dst = v_ptr + cache_at + (head - HEADS - KV_HEADS) * cache_head_stride
        tl.store(dst, lo)
        tl.store(dst + HALF, hi)


def _rms_norm(
    x_ptr,
    row_stride,
    weight_ptr,
    out_ptr,
    eps,
    WIDTH: tl.constexpr,
    VECTOR: tl.constexpr,
    THREADS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """qwen-tts's RMSNorm of rows [rows, WIDTH] into out [rows, WIDTH]: the mean of squares in float32 (its
    sum in torch's order for its layout, `torch_sum_layout`), the normed value rounded to the dtype, then its
    product with the weight rounded (where `F.rms_norm` rounds once, at the end)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < WIDTH
    x = tl.load(x_ptr + row * row_stride + cols, mask=inside, other=0.0)
    x32 = x.to(tl.float32)
    # The mean is torch's: the sum times 1 / WIDTH (IEEE division; Triton's `/` is div.full, approximate).
    # tl.rsqrt is MUFU.RSQ, as torch.rsqrt runs on sm_90 (its SASS); 1 / tl.sqrt would be two
    # approximations, sqrt.approx and div.full.
    squares = _sum_of_squares(x_ptr + row * row_stride, WIDTH, THREADS, VECTOR)
    scale = tl.rsqrt(squares * tl.math.div_rn(1.0, 1.0 * WIDTH) + eps)
    weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    out = (weight * (x32 * scale).to(x.dtype).to(tl.float32)).to(x.dtype)
    tl.store(out_ptr + row * WIDTH + cols, out, mask=inside)


def _silu_mul(gate_up_ptr, row_stride, out_ptr, width, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr):
    """SiLU(gate) * up for rows [rows, 2 * width] (gate, then up) into out [rows, width]; as torch
    computes SiLU (x / (1 + exp(-x)) in float32) and rounds it, then the product. With LIBDEVICE (CUDA),
    exp is CUDA's expf and the division IEEE, which is how nvcc compiled torch's SiLU (its SASS: expf's
    last product fused with the 1 +, hence FP_FUSION); tl.exp would be ex2.approx of x * log2(e)."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < width
    gate = tl.load(gate_up_ptr + row * row_stride + cols, mask=inside, other=0.0)
    up = tl.load(gate_up_ptr + row * row_stride + width + cols, mask=inside, other=0.0)
    g = gate.to(tl.float32)
    if LIBDEVICE:
        e = libdevice.exp(-g)
    else:  # Triton's interpreter has no libdevice
        e = tl.exp(-g)
    silu = tl.math.div_rn(g, 1.0 + e).to(up.dtype).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (silu * up.to(tl.float32)).to(up.dtype), mask=inside)


def _sample_top_k(
    logits_ptr,
    logits_stride,
    noise_ptr,
    noise_stride,
    temperature_ptr,
    top_k_ptr,
    do_sample_ptr,
    out_ptr,
    vocab,
    candidates,
    GREEDY_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row's token: among its logits / temperature at or above their k-th largest (k = top_k within
    [1, candidates]), the largest with its Gumbel noise added; a greedy row (GREEDY_ROWS) the argmax of
    its logits. The k-th largest is found bit by bit over the values' order-preserving unsigned keys: the
    largest key that k values reach (32 counts, no sort)."""
    row = tl.program_id(0)
    ids = tl.arange(0, BLOCK)
    inside = ids < vocab
    logits = tl.load(logits_ptr + row * logits_stride + ids, mask=inside, other=float("-inf"))
    scaled = tl.math.div_rn(logits, tl.load(temperature_ptr + row))  # IEEE, as torch's `/` (not div.full)
    k = tl.minimum(tl.maximum(tl.load(top_k_ptr + row), 1), candidates)
    bits = scaled.to(tl.uint32, bitcast=True)
    keys = tl.where((bits >> 31) == 1, bits ^ 0xFFFFFFFF, bits | 0x80000000)  # unsigned order = float order
    kth = tl.full((), 0, tl.uint32)
    for bit in tl.static_range(31, -1, -1):
        trial = kth | (1 << bit)
        reached = tl.reduce((keys >= trial).to(tl.int32), 0, tl.standard._sum_combine)
        kth = tl.where(reached >= k, trial, kth)
    noise = tl.load(noise_ptr + row * noise_stride + ids, mask=inside, other=0.0)
    score = tl.where(keys >= kth, scaled + noise, float("-inf"))
    _, token = tl.reduce((score, ids), 0, tl.standard._argmax_combine_tie_break_left)
    if GREEDY_ROWS:
        if tl.load(do_sample_ptr + row) == 0:
            _, token = tl.reduce((logits, ids), 0, tl.standard._argmax_combine_tie_break_left)
    tl.store(out_ptr + row, token.to(tl.int64))


def _decode_attention_split(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    part_ptr,
    stats_ptr,
    cache_slot_stride,
    cache_head_stride,
    cache_pos_stride,
    scale_log2,
    programs,
    HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    SPLIT: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """`programs` programs per (row, KV head), program i taking splits i, i + programs, ... of SPLIT keys
    up to the row's own position (its live keys; a program past them returns at once; with programs =
    SPLITS, one split each): the GROUP query heads that read this KV head (qwen-tts's repeat_kv: head h
    reads KV head h // GROUP) over the split's keys. The first block of a split has a live key, so the
    running max is finite from it on. Writes each split's unnormalised sum of p * v [GROUP, D] to part
    [rows, HEADS, SPLITS, D] and its running max and sum of p (base 2) to stats [rows, HEADS, SPLITS, 2],
    in float32, for `_decode_attention_combine`: a split's values do not depend on `programs`."""
    row = tl.program_id(0).to(tl.int64)  # (cache offsets can pass 2**31 with many long slots)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(pos_ptr + row) + 1
    g = tl.arange(0, GROUP)
    d = tl.arange(0, D)
    head = kv_head * GROUP + g
    base = row * cache_slot_stride + kv_head * cache_head_stride
    while split * SPLIT < length:
        start = split * SPLIT
        q = tl.load(q_ptr + (row * HEADS + head[:, None]) * D + d[None, :]).to(tl.float32)  # [GROUP, D]
        best = tl.full([GROUP], float("-inf"), tl.float32)
        total = tl.full([GROUP], 0.0, tl.float32)
        acc = tl.full([GROUP, D], 0.0, tl.float32)
        for block in range(SPLIT // BLOCK):  # (a block past the live keys loads nothing)
            at = start + block * BLOCK + tl.arange(0, BLOCK)
            live = at < length
            where = base + at[:, None] * cache_pos_stride + d[None, :]
            k = tl.load(k_ptr + where, mask=live[:, None], other=0.0).to(tl.float32)  # [BLOCK, D]
            products = q[:, None, :] * k[None, :, :]  # [GROUP, BLOCK, D]
            scores = tl.reduce(products, 2, tl.standard._sum_combine) * scale_log2
            scores = tl.where(live[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.reduce(scores, 1, tl.standard._elementwise_max))
            shrink = tl.exp2(best - new_best)
            p = tl.exp2(scores - new_best[:, None])
            v = tl.load(v_ptr + where, mask=live[:, None], other=0.0).to(tl.float32)
            total = total * shrink + tl.reduce(p, 1, tl.standard._sum_combine)
            acc = acc * shrink[:, None] + tl.reduce(p[:, :, None] * v[None, :, :], 1, tl.standard._sum_combine)
            best = new_best
        at_split = (row * HEADS + head) * SPLITS + split
        tl.store(part_ptr + at_split[:, None] * D + d[None, :], acc)
        tl.store(stats_ptr + at_split * 2, best)
        tl.store(stats_ptr + at_split * 2 + 1, total)
        split += programs


def _decode_attention_combine(
    part_ptr,
    stats_ptr,
    pos_ptr,
    out_ptr,
    HEADS: tl.constexpr,
    D: tl.constexpr,
    SPLIT: tl.constexpr,
    SPLITS: tl.constexpr,
    SPLITS_BLOCK: tl.constexpr,
):
    """One program per (row, query head): the splits its live keys covered, rescaled to their common max
    and summed in a fixed order (so a row's values depend on nothing but its own keys), into out
    [rows, HEADS, D] in the output's dtype."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    used = (tl.load(pos_ptr + row) + SPLIT) // SPLIT  # splits with live keys: ceil((position + 1) / SPLIT)
    s = tl.arange(0, SPLITS_BLOCK)
    d = tl.arange(0, D)
    valid = s < used
    at = (row * HEADS + head) * SPLITS + s
    best = tl.load(stats_ptr + at * 2, mask=valid, other=float("-inf"))
    total = tl.load(stats_ptr + at * 2 + 1, mask=valid, other=0.0)
    top = tl.reduce(best, 0, tl.standard._elementwise_max)
    weight = tl.where(valid, tl.exp2(best - top), 0.0)
    part = tl.load(part_ptr + at[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
    numerator = tl.reduce(part * weight[:, None], 0, tl.standard._sum_combine)
    out = tl.math.div_rn(numerator, tl.reduce(total * weight, 0, tl.standard._sum_combine))
    tl.store(out_ptr + (row * HEADS + head) * D + d, out.to(out_ptr.dtype.element_ty))


_KERNELS = {
    "qk_norm_rope_kv": _qk_norm_rope_kv,
    "rms_norm": _rms_norm,
    "silu_mul": _silu_mul,
    "sample_top_k": _sample_top_k,
    "decode_attention_split": _decode_attention_split,
    "decode_attention_combine": _decode_attention_combine,
}
# Whether LLVM may fuse a product and a sum into one FMA, with one rounding (Triton's default). torch's ops
# round the product first (q * cos, then + rotate_half(q) * sin; pow(2), then the mean), so only SiLU fuses:
# the expf inside torch's SiLU ends in such an FMA with the 1 + (its SASS on sm_90).
FP_FUSION = {"silu_mul": True}
# Integers whose values vary between the step's calls and would each compile a variant of their own where
# one is 1 or a multiple of 16 (Triton's default): the prompt's length and the code predictor's position,
# and the decode attention's programs per row and KV head (one per batch size with `looped`).
NOT_SPECIALIZED = {"qk_norm_rope_kv": ("pos_offset", "tokens"), "decode_attention_split": ("programs",)}


@cache
def _kernel(name: str, device_type: str):
    """The kernel compiled for CUDA, or in Triton's interpreter for CPU tensors (tests). Either way it calls
    `_sum_of_squares` in its own form (a JITFunction or an InterpretedFunction), so the kernel is a copy
    of the function with that name rebound in its globals."""
    from triton.runtime.interpreter import InterpretedFunction

    wrap = triton.jit if device_type == "cuda" else InterpretedFunction
    original = _KERNELS[name]
    fn = types.FunctionType(
        original.__code__, original.__globals__ | {"_sum_of_squares": wrap(_sum_of_squares)}, original.__name__
    )
    fn.__annotations__ = original.__annotations__  # (Triton reads constexpr parameters from them)
    if device_type == "cuda":
        return triton.jit(fn, do_not_specialize=NOT_SPECIALIZED.get(name, ()))
    return InterpretedFunction(fn)


def _launch(name: str, device_type: str, grid: tuple[int, ...], *args, **meta) -> None:
    """Runs kernel `name` over `grid`, with its FP_FUSION (the interpreter ignores compile options)."""
    _kernel(name, device_type)[grid](*args, enable_fp_fusion=FP_FUSION.get(name, False), **meta)


QK_WARPS = 1  # a program's vectors are half a head (64 elements at 128): one warp's lanes hold them


def qk_norm_rope_into_cache(
    qkv: torch.Tensor,
    tokens: int,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    offset: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    heads: int,
    kv_heads: int,
    eps: float,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """qkv rows [batch * tokens, (heads + 2 * kv_heads) * D] -> q [batch, heads, tokens, D] (a view),
    normed and rotated; k (normed, rotated) and v written to keys/values [slots, kv_heads, L, D] at slot =
    slots[row] (or the batch row when None; unchecked, like an index on the device), position =
    positions[row] (or 0 when None) + offset + token. `weight`: [heads + kv_heads,
    D]; cos/sin: [positions, D] (sin sign-flipped on its first half, as `Stack.sin`). The norms sum in
    torch's order for a request of `tokens` tokens alone (`torch_sum_layout`)."""
    rows, d = qkv.shape[0], cos.shape[-1]
    # The kernel reads and writes by offsets, unchecked: what the shapes and layouts promise is checked here
    # (host-side, no sync; a captured graph replays without it).
    expected = {
        "qkv": (qkv.shape[1] == (heads + 2 * kv_heads) * d and rows % tokens == 0 and qkv.stride(1) == 1),
        "weight": weight.shape == (heads + kv_heads, d) and weight.is_contiguous(),
        "cos/sin": cos.shape == sin.shape and cos.is_contiguous() and sin.is_contiguous(),
        "keys/values": keys.shape == values.shape
        and keys.stride() == values.stride()
        and keys.stride(3) == 1
        and keys.shape[1] == kv_heads
        and keys.shape[3] == d
        and (slots is not None or keys.shape[0] >= rows // tokens),
        "positions": positions is None or (positions.shape == (rows // tokens,) and positions.is_contiguous()),
        "slots": slots is None or (slots.shape == (rows // tokens,) and slots.is_contiguous()),
    }
    if not all(expected.values()):
        wrong = ", ".join(name for name, ok in expected.items() if not ok)
        raise ValueError(f"qk_norm_rope_into_cache: {wrong} do not have the shape or layout the kernel reads")
    q = torch.empty(rows // tokens, tokens, heads, d, dtype=qkv.dtype, device=qkv.device)
    (vector, q_threads), (_, k_threads) = torch_sum_layout(d, tokens * heads), torch_sum_layout(d, tokens * kv_heads)
    _launch(
        "qk_norm_rope_kv",
        qkv.device.type,
        (rows, heads + 2 * kv_heads),
        qkv,
        qkv.stride(0),
        weight,
        cos,
        sin,
        qkv if positions is None else positions,  # (not read without positions)
        offset,
        qkv if slots is None else slots,  # (nor without slots)
        q,
        keys,
        values,
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        tokens,
        eps,
        HEADS=heads,
        KV_HEADS=kv_heads,
        HALF=d // 2,
        HAS_POS=positions is not None,
        HAS_SLOTS=slots is not None,
        VECTOR=vector,
        Q_THREADS=q_threads,
        K_THREADS=k_threads,
        num_warps=QK_WARPS,
    )
    return q.transpose(1, 2)


@cache  # (called per launch on eager paths: a pure function of two integers)
def torch_sum_layout(width: int, rows: int) -> tuple[int, int]:
    """(V, W): how torch's CUDA reduction kernel (ATen's Reduce.cuh, `setReduceConfig`) splits the sum over
    the last dimension of contiguous float32 rows [rows, width], as in RMSNorm's `pow(2).mean(-1)`: W
    threads a row, each loading V values at a time (4 where the row is longer than 128).

    The order of the sums follows from it (`_sum_of_squares`), and it depends on `rows`, so qwen-tts's own
    values depend on how many rows a call norms. The kernels take the rows a request alone would have (its
    tokens, times its heads for the q/k norms), so each row gets a lone request's bits in any batch."""
    vector = 4 if width > 128 else 1
    if width % vector:
        raise ValueError(f"torch's reduction of rows of {width} starts unaligned; not reproduced")
    dim0, dim1 = width // vector, max(rows, 1)
    dim0_pow2 = 1 << (dim0.bit_length() - 1) if dim0 < 512 else 512
    dim1_pow2 = 1 << (dim1.bit_length() - 1) if dim1 < 512 else 512
    threads = min(dim0_pow2, 32)
    height = min(dim1_pow2, 512 // threads)
    threads = min(dim0_pow2, 512 // height)
    per_thread = -(-width // threads)
    if per_thread >= 256 or (height > 1 and per_thread >= height * 16):  # a row's sum split across warps
        raise ValueError(f"torch splits rows of {width} across warps at {rows} rows; not reproduced")
    return vector, threads


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, tokens: int) -> torch.Tensor:
    """qwen-tts's RMSNorm (`Qwen3TTSRMSNorm`) of rows [rows, width] with contiguous columns, in one kernel
    that rounds where qwen-tts rounds and sums as torch does for a request of `tokens` rows alone."""
    rows, width = x.shape[0], x.shape[-1]
    if x.dim() != 2 or x.stride(1) != 1 or weight.shape != (width,) or not weight.is_contiguous():
        raise ValueError("rms_norm: x must be rows [rows, width] with contiguous columns, and weight [width]")
    out = torch.empty(rows, width, dtype=x.dtype, device=x.device)
    vector, threads = torch_sum_layout(width, tokens)
    block = triton.next_power_of_2(width)
    meta = {"WIDTH": width, "VECTOR": vector, "THREADS": threads, "BLOCK": block}
    _launch("rms_norm", x.device.type, (rows,), x, x.stride(0), weight, out, eps, **meta)
    return out


SILU_BLOCK = 1024


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of rows [rows, 2 * width] (gate first, as the fused gate/up product), [rows, width]."""
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError("silu_mul: gate_up must be rows [rows, 2 * width] with contiguous columns")
    out = torch.empty(rows, width, dtype=gate_up.dtype, device=gate_up.device)
    device = gate_up.device.type
    grid = (rows, triton.cdiv(width, SILU_BLOCK))
    _launch(
        "silu_mul", device, grid, gate_up, gate_up.stride(0), out, width, BLOCK=SILU_BLOCK, LIBDEVICE=device == "cuda"
    )
    return out


# Keys a split program reads (a decode attention's unit of parallel work), and per loop: a block of 16 keys
# compiles to 128 registers a thread on sm_90 and none spilled (32: 243; 64: spills). Unmeasured on a GPU: a
# lone row of 500 keys is 4 splits x 8 KV heads, 32 programs of 64 KB of K and V each.
ATTENTION_SPLIT = 128
ATTENTION_BLOCK = 16
# With `looped`, split programs a streaming multiprocessor is given: 4 fit at 128 registers a thread.
ATTENTION_PROGRAMS_PER_SM = 4
CPU_STAND_IN_SMS = 2  # (the interpreter has none: few programs, so the tests run the loop)


@cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_STAND_IN_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def attention_programs(rows: int, kv_heads: int, splits: int, device: torch.device) -> int:
    """Split programs per (row, KV head) with `looped`: enough for ATTENTION_PROGRAMS_PER_SM on every
    multiprocessor, at most one a split. A lone row gets one a split (as without `looped`); 32 rows of 8 KV
    heads on an H100's 132 get 3, each looping over a third of a row's splits, where one a split schedules
    a program for every split of the cache (28 at 3,584 positions), most of them past the live keys."""
    wanted = -(-ATTENTION_PROGRAMS_PER_SM * _multiprocessors(device) // max(rows * kv_heads, 1))
    return max(1, min(splits, wanted))


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    looped: bool = False,
) -> torch.Tensor:
    """One query per row, q [n, heads, 1, D] (rows' heads contiguous), over each row's live keys only:
    keys/values [slots, kv_heads, L, D] at slot = the row and positions 0 to positions[row] (inclusive),
    query head h reading KV head h // (heads / kv_heads) as qwen-tts's repeat_kv. Returns [n, heads, 1, D].

    Why: inside a CUDA graph SDPA attends a fixed number of keys, so the step had a graph per length bucket
    and attended each row's masked-out keys up to it. Here a row reads its own keys, whatever the other
    rows' lengths, in two launches (splits of ATTENTION_SPLIT keys in parallel, then their combination in a
    fixed order), so its values depend on nothing but its own keys (batch invariant) and one graph serves
    every length. Softmax in float32 with base-2 exponentials, as flash attention computes it; the values
    are not SDPA's bits. `looped`: fewer split programs, each looping over several splits
    (`attention_programs`), with the same bits (an alternative the kit times; not the service's yet)."""
    n, heads, d = q.shape[0], q.shape[1], q.shape[-1]
    kv_heads, max_len = keys.shape[1], keys.shape[2]
    group = heads // max(kv_heads, 1)
    expected = {
        "q": q.shape == (n, heads, 1, d) and q.reshape(n, heads, d).is_contiguous(),
        "heads": heads == group * kv_heads and group & (group - 1) == 0 and d & (d - 1) == 0,
        "keys/values": keys.shape == values.shape
        and keys.stride() == values.stride()
        and keys.stride(3) == 1
        and keys.shape[0] >= n
        and keys.shape[3] == d,
        "positions": positions.shape == (n,) and positions.is_contiguous(),
    }
    if not all(expected.values()):
        wrong = ", ".join(name for name, ok in expected.items() if not ok)
        raise ValueError(f"decode_attention: {wrong} do not have the shape or layout the kernel reads")
    splits = triton.cdiv(max_len, ATTENTION_SPLIT)
    part = torch.empty(n, heads, splits, d, dtype=torch.float32, device=q.device)
    stats = torch.empty(n, heads, splits, 2, dtype=torch.float32, device=q.device)
    out = torch.empty(n, heads, d, dtype=q.dtype, device=q.device)
    device = q.device.type
    programs = attention_programs(n, kv_heads, splits, q.device) if looped else splits
    _launch(
        "decode_attention_split", device, (n, kv_heads, programs),
        q, keys, values, positions, part, stats, keys.stride(0), keys.stride(1), keys.stride(2),
        scale * 1.4426950408889634,  # log2(e): exp(x) = exp2(x * log2(e))
        programs, HEADS=heads, GROUP=group, D=d, SPLIT=ATTENTION_SPLIT, SPLITS=splits, BLOCK=ATTENTION_BLOCK,
    )  # fmt: skip
    _launch(
        "decode_attention_combine", device, (n, heads),
        part, stats, positions, out,
        HEADS=heads, D=d, SPLIT=ATTENTION_SPLIT, SPLITS=splits, SPLITS_BLOCK=triton.next_power_of_2(splits),
    )  # fmt: skip
    return out.unsqueeze(2)


def _reference_qk(qkv, tokens, weight, cos, sin, positions, offset, heads, kv_heads, eps):
    """The eager ops the q/k kernel stands for, in float32 (for `usable`): q, k and v [rows, heads, D]."""
    d = cos.shape[-1]
    x = qkv.float().view(qkv.shape[0], heads + 2 * kv_heads, d)
    qk, v = x[:, : heads + kv_heads], x[:, heads + kv_heads :]
    normed = qk * torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    at = torch.arange(qkv.shape[0], device=qkv.device)
    at = at % tokens + offset + (0 if positions is None else positions[at // tokens])
    rotated = normed * cos.float()[at][:, None] + normed.roll(d // 2, dims=-1) * sin.float()[at][:, None]
    return rotated[:, :heads], rotated[:, heads:], v


# A row's vocabulary (2048 or 3072, a block of 2048 or 4096) over 8 warps, at most 16 values a thread for each
# of the 32 counts (Triton's default of 4 doubles that; its row-softmax tutorial takes 8 from 2048 columns).
# Unmeasured: the kit's sampled step times will say whether the kernel pays.
SAMPLE_WARPS = 8


def sample_top_k(
    logits: torch.Tensor,
    noise: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    do_sample: torch.Tensor,
    candidates: int,
    greedy_rows: bool,
) -> torch.Tensor:
    """`sampling.choose_among_top` without top-p, in one kernel: rows' tokens [n] from float32 logits [n, V]
    and the Gumbel noise of their draws [n, >= V] (`frame_step.frame_noise`), with per-row temperature,
    top-k (within [1, candidates]) and, with `greedy_rows`, do_sample (else every row samples). The same
    token as over the candidates unless more than TIE_MARGIN logits tie with a row's k-th largest."""
    rows, vocab = logits.shape
    expected = {
        "logits": logits.dtype == torch.float32 and logits.stride(1) == 1,
        "noise": noise.shape[0] == rows and noise.shape[1] >= vocab and noise.stride(1) == 1,
        "row settings": all(t.shape == (rows,) and t.is_contiguous() for t in (temperature, top_k, do_sample)),
    }
    if not all(expected.values()):
        wrong = ", ".join(name for name, ok in expected.items() if not ok)
        raise ValueError(f"sample_top_k: {wrong} do not have the shape or layout the kernel reads")
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    _launch(
        "sample_top_k", logits.device.type, (rows,),
        logits, logits.stride(0), noise, noise.stride(0), temperature, top_k, do_sample, out, vocab, candidates,
        GREEDY_ROWS=greedy_rows, BLOCK=triton.next_power_of_2(vocab), num_warps=SAMPLE_WARPS,
    )  # fmt: skip
    return out


def _check_attention(heads: int, kv_heads: int, d: int, length: int, dtype: torch.dtype, generator) -> None:
    """`decode_attention` against softmax(q k / sqrt(D)) v over each row's live keys (float32, qwen-tts's
    repeat_kv), in a cache of `length` positions, at positions that end within the first split, at the next
    one's first key and at the cache's end. The output is a weighted mean of up to `length` values, so the
    tolerance is relative to the values' scale, with room for float32 sums over thousands of keys (a kernel
    that read past the live keys is off by about the values' scale)."""
    device = generator.device
    q = torch.randn(3, heads, 1, d, generator=generator, device=device).to(dtype)
    keys, values = (torch.randn(3, kv_heads, length, d, generator=generator, device=device).to(dtype) for _ in "kv")
    positions = torch.tensor([0, min(ATTENTION_SPLIT, length - 1), length - 1], device=device)
    got = decode_attention(q, keys, values, positions, d**-0.5)
    if not torch.equal(decode_attention(q, keys, values, positions, d**-0.5, looped=True), got):
        raise ValueError("the decode attention's looped splits differ from one program a split")
    for row, position in enumerate(positions.tolist()):
        k, v = (t[row, :, : position + 1].float().repeat_interleave(heads // kv_heads, 0) for t in (keys, values))
        expected = torch.softmax(q[row].float() @ k.transpose(-1, -2) * d**-0.5, dim=-1) @ v
        tolerance = 4 * torch.finfo(dtype).eps + 64 * torch.finfo(torch.float32).eps
        if not torch.allclose(got[row].float(), expected, rtol=tolerance, atol=tolerance * v.abs().max().item()):
            error = (got[row].float() - expected).abs().max().item()
            raise ValueError(f"a kernel's values differ from the eager ops' by {error} (decode attention)")


def _check_sampling(logits: torch.Tensor, generator: torch.Generator) -> None:
    """`sample_top_k` against `choose_among_top` (greedy rows on and off): the same tokens."""
    rows, device = logits.shape[0], logits.device
    noise = gumbel_noise(torch.rand(logits.shape, generator=generator, device=device))
    temperature = torch.full((rows,), 0.9, device=device)
    top_k = torch.arange(rows, device=device) * 20 + 1
    do_sample = torch.arange(rows, device=device) % 2 == 0
    for greedy_rows in (True, False):
        plan = SamplerPlan(candidates=50, top_p=False, greedy_rows=greedy_rows)
        settings = (do_sample, temperature, top_k, torch.ones(rows, device=device))
        expected = choose_among_top(logits, *settings, Draws(noise=noise), torch.empty(0), plan)
        got = sample_top_k(logits, noise, temperature, top_k, do_sample, plan.candidates, greedy_rows)
        if not torch.equal(got, expected):
            raise ValueError(f"the sampling kernel chose {got.tolist()} where the eager ops chose {expected.tolist()}")


# The step's calls (tokens per row, a position per row, offset, a slot per row): the talker's (one token),
# the code predictor's first step (two tokens from position 0) and its later ones (one token at a fixed
# position), and a prefill's (a prompt from position 0 into the requests' own slots).
STEP_CALLS = ((1, True, 0, False), (2, False, 0, False), (1, False, 5, False), (5, False, 0, True))
# A request's tokens per norm call, one for each of torch's layouts (`torch_sum_layout`: rows up to 16, in
# powers of 2): a step's 1, the code predictor's first 2, and a prompt's up to 16 and more.
NORM_TOKENS = (1, 2, 4, 8, 16)


def usable(
    device: torch.device,
    dtype: torch.dtype,
    sizes: Sequence[tuple[int, int, int, int, int]],
    vocabularies: Sequence[int],
) -> bool:
    """Whether the layer and sampling kernels compile and run on `device` and agree with the eager ops
    there, checked at start-up on small tensors of each stack's `sizes` (heads, kv_heads, head_dim, MLP
    width, hidden size) in each of the step's call forms and on logits of each of the `vocabularies`, so
    every variant the step launches is compiled here, where a failure costs nothing: False (with a warning)
    where Triton cannot serve this GPU or dtype. (The decode attention: `attention_usable`.)"""
    if triton is None:
        logger.warning("Triton is not installed: the frame step runs without its Triton kernels")
        return False
    started = time.perf_counter()
    try:
        generator = torch.Generator(device=device).manual_seed(0)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator, device=device).to(dtype)

        tolerance = 4 * torch.finfo(dtype).eps  # a few roundings in the dtype, relative to the values

        def check(got: torch.Tensor, expected: torch.Tensor) -> None:
            if not torch.allclose(got.float(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item()):
                error = (got.float() - expected).abs().max().item()
                raise ValueError(f"a kernel's values differ from the eager ops' by {error}")

        batch, length = 3, 16
        for heads, kv_heads, d, width, hidden in sizes:
            weight, cos, sin = rand(heads + kv_heads, d), rand(length, d), rand(length, d)
            for tokens, with_positions, offset, with_slots in STEP_CALLS:
                qkv = rand(batch * tokens, (heads + 2 * kv_heads) * d)
                positions = torch.tensor([0, 3, 9], device=device) if with_positions else None
                slots = torch.tensor([2, 0, 1], device=device) if with_slots else None
                keys, values = rand(batch, kv_heads, length, d), rand(batch, kv_heads, length, d)
                arguments = (qkv, tokens, weight, cos, sin, positions, offset)
                q = qk_norm_rope_into_cache(*arguments, keys, values, heads, kv_heads, 1e-6, slots)
                ref_q, ref_k, ref_v = _reference_qk(*arguments, heads, kv_heads, 1e-6)
                at = torch.arange(tokens, device=device).repeat(batch) + offset
                if positions is not None:
                    at += positions.repeat_interleave(tokens)
                rows = torch.arange(batch, device=device).repeat_interleave(tokens)
                if slots is not None:
                    rows = slots[rows]
                check(q.transpose(1, 2).reshape(-1, heads, d), ref_q)
                check(keys[rows, :, at], ref_k)
                check(values[rows, :, at], ref_v)
            gate_up = rand(batch, 2 * width)
            gate, up = gate_up.float().split(width, dim=-1)
            check(silu_mul(gate_up), torch.nn.functional.silu(gate) * up)
            x, norm_weight = rand(batch, hidden), rand(hidden)
            expected = torch.nn.functional.rms_norm(x.float(), (hidden,), norm_weight.float(), 1e-6)
            for tokens in NORM_TOKENS:
                check(rms_norm(x, norm_weight, 1e-6, tokens), expected)
        for vocab in vocabularies:
            _check_sampling(rand(batch, vocab).float() * 3, generator)
    except Exception as error:  # a compiler or driver failure: the eager forms still serve
        logger.warning("the frame step runs without its Triton kernels: they failed on %s: %r", device, error)
        return False
    # (compiling is most of it; TRITON_CACHE_DIR keeps the binaries for the next start)
    logger.info("Triton kernels compiled and checked on %s in %.1f s", device, time.perf_counter() - started)
    return True


def attention_usable(
    device: torch.device, dtype: torch.dtype, size: tuple[int, int, int, int, int], max_len: int | None = None
) -> bool:
    """Whether `decode_attention` compiles and runs on `device` and agrees with softmax over the live keys
    there, for the talker's `size` (only its steps attend with the kernel) in a cache of `max_len` positions
    (the step's: its number of splits is a constant of the kernel, so the variant the step launches is the
    one compiled here). Apart from `usable`, so a failure here keeps the layer kernels: False (with a
    warning) and the step attends with SDPA."""
    if triton is None:
        return False
    started = time.perf_counter()
    heads, kv_heads, d, _, _ = size
    try:
        generator = torch.Generator(device=device).manual_seed(0)
        _check_attention(heads, kv_heads, d, max_len or 2 * ATTENTION_SPLIT + 5, dtype, generator)
    except Exception as error:  # a compiler or driver failure: SDPA's masked call still serves
        logger.warning("the talker attends with SDPA: the Triton decode attention failed on %s: %r", device, error)
        return False
    logger.info("Triton decode attention compiled and checked on %s in %.1f s", device, time.perf_counter() - started)
    return True


def usable_forms(
    device: torch.device,
    dtype: torch.dtype,
    sizes: Sequence[tuple[int, int, int, int, int]],
    vocabularies: Sequence[int],
    max_len: int | None,
    attention: bool = True,
) -> tuple[bool, bool]:
    """Whether the layer and sampling kernels pass `usable`, and with them (where `attention` asks for it)
    whether the decode attention passes `attention_usable` at the talker's sizes (`sizes[0]`)."""
    if not usable(device, dtype, sizes, vocabularies):
        return False, False
    return True, attention and attention_usable(device, dtype, sizes[0], max_len)


def compiled_for(arch: int) -> dict[str, object]:
    """Each kernel compiled ahead of time for sm_<arch> with no GPU present (Triton to PTX, ptxas to a
    cubin), in bf16 at the 1.7B's sizes and with the options `_launch` gives it; the q/k kernel and RMSNorm
    also in the prefill's form (torch's order of sums for 16 tokens). The tests and
    scripts/kernel_instructions.py read their code."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointer, number = "*bf16", "i32"
    qk = dict.fromkeys(["qkv_ptr", "weight_ptr", "cos_ptr", "sin_ptr", "q_ptr", "k_ptr", "v_ptr"], pointer)
    qk |= {"pos_ptr": "*i64", "slots_ptr": "*i64", "eps": "fp32"}
    strides = ["qkv_row_stride", "pos_offset", "cache_slot_stride", "cache_head_stride", "cache_pos_stride"]
    qk |= dict.fromkeys([*strides, "tokens"], number)
    step = {"HEADS": 16, "KV_HEADS": 8, "HALF": 64, "HAS_POS": True, "HAS_SLOTS": False}
    (vector, q_threads), (_, k_threads) = torch_sum_layout(128, 16), torch_sum_layout(128, 8)
    step |= {"VECTOR": vector, "Q_THREADS": q_threads, "K_THREADS": k_threads}
    prefill = step | {"HAS_POS": False, "HAS_SLOTS": True, "K_THREADS": torch_sum_layout(128, 8 * 16)[1]}
    norm = {"x_ptr": pointer, "row_stride": number, "weight_ptr": pointer, "out_ptr": pointer, "eps": "fp32"}
    norm_step = {"WIDTH": 2048, "BLOCK": 2048} | dict(
        zip(("VECTOR", "THREADS"), torch_sum_layout(2048, 1), strict=True)
    )
    silu = {"gate_up_ptr": pointer, "row_stride": number, "out_ptr": pointer, "width": number}
    sample = {"logits_ptr": "*fp32", "noise_ptr": "*fp32", "temperature_ptr": "*fp32", "top_k_ptr": "*i64"}
    sample |= {"do_sample_ptr": "*i1", "out_ptr": "*i64"}
    sample |= dict.fromkeys(["logits_stride", "noise_stride", "vocab", "candidates"], number)
    attention = dict.fromkeys(["q_ptr", "k_ptr", "v_ptr"], pointer) | {"pos_ptr": "*i64", "scale_log2": "fp32"}
    attention |= dict.fromkeys(["part_ptr", "stats_ptr"], "*fp32")
    attention |= dict.fromkeys(["cache_slot_stride", "cache_head_stride", "cache_pos_stride", "programs"], number)
    splits = triton.cdiv(1536 + 2048, ATTENTION_SPLIT)  # the default settings' cache
    split_sizes = {"HEADS": 16, "D": 128, "SPLIT": ATTENTION_SPLIT, "SPLITS": splits}
    combine = {"part_ptr": "*fp32", "stats_ptr": "*fp32", "pos_ptr": "*i64", "out_ptr": pointer}
    sources = {
        "decode_attention_split": (attention, split_sizes | {"GROUP": 2, "BLOCK": ATTENTION_BLOCK}, 4),
        "decode_attention_combine": (combine, split_sizes | {"SPLITS_BLOCK": triton.next_power_of_2(splits)}, 4),
        "qk_norm_rope_kv": (qk, step, QK_WARPS),
        "qk_norm_rope_kv prefill": (qk, prefill, QK_WARPS),
        "rms_norm": (norm, norm_step, 4),
        "rms_norm prefill": (norm, norm_step | {"THREADS": torch_sum_layout(2048, 16)[1]}, 4),
        "silu_mul": (silu, {"BLOCK": SILU_BLOCK, "LIBDEVICE": True}, 4),
        "sample_top_k": (sample, {"GREEDY_ROWS": True, "BLOCK": 4096}, SAMPLE_WARPS),
    }
    compiled = {}
    for name, (signature, constants, warps) in sources.items():
        kernel = name.split()[0]
        source = ASTSource(
            _kernel(kernel, "cuda"), signature | dict.fromkeys(constants, "constexpr"), constexprs=constants
        )
        options = {"num_warps": warps, "enable_fp_fusion": FP_FUSION.get(kernel, False)}
        compiled[name] = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled
