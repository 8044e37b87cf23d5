"""One codec frame for every request in the step batch, as plain tensor code over qwen-tts's weights.

Why our own step: qwen-tts's talker forward runs HF `generate` for the 15 residual codebooks (about
4,900 kernel launches and 15 host syncs per frame) and keeps a `DynamicCache` that must be padded,
concatenated and re-indexed whenever a request joins or leaves. Here:

- **KV slots.** The talker's K/V live in preallocated per-layer tensors `[slots, kv_heads, max_len,
  head_dim]`. A request owns one slot from prefill to its end; its row in the step batch *is* its slot,
  so the step reads `cache[:n]` as a view, never a gather. Join writes only the joining slot; leave
  flips its `active` flag. No other row's cache moves. Idle slots inside the window compute into their
  own (free) slot, which acts as the scratch row.
- **Positions per slot**, so there is no left padding: each row attends to keys `0..position`.
- **The code predictor** is an unrolled loop of 15 steps over a small static per-frame cache.
- **Sampling on the device** (`sampling.py`), with per-row settings and seeds.

`frame_step` has no host sync and builds no tensor from Python data, so it can be captured as one
CUDA graph per batch size and compiles with `torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from tts_service import fused_kernels
from tts_service.batch_invariance import ProductShape
from tts_service.sampling import (
    Draws,
    SamplerPlan,
    SamplingParams,
    choose_among_top,
    draws_from,
    filter_and_choose,
    gumbel_noise,
    mixed_ids,
    row_keys,
)

logger = logging.getLogger(__name__)

NUM_CODE_GROUPS = 16
# MKL multiplies few rows with other kernels than many. A step's products run over n rows, so without
# padding a request's last bits, and now and then a sampled code, would depend on how many others share its
# steps: a seed would not replay byte for byte. From how many rows on every row keeps its bits depends on
# the CPU and the weights' layout, so `batch_invariance` measures it at start-up and the fewest rows that
# hold are kept: 2 with contiguous weights on an Intel Sapphire Rapids, 4 with the model's own (transposed
# views) on an AMD EPYC. One row never does (a matrix-vector kernel), so it is not tried.
INVARIANT_ROW_PADDINGS = (2, 4)
INVARIANT_MIN_ROWS = 4  # the padding when nothing is measured: the one that held on every CPU measured


@dataclass
class LayerWeights:
    """One transformer layer; q/k/v and gate/up are fused into single matrices. Matrices are held as
    [in, out], ready for `linear`: transposed views of the model's own weights, or contiguous."""

    input_norm: torch.Tensor
    qkv_t: torch.Tensor
    qkv_bias: torch.Tensor | None
    qk_norm: torch.Tensor  # [heads + kv_heads, head_dim]: q_norm's weight per query head, then k_norm's
    o_t: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up_t: torch.Tensor
    down_t: torch.Tensor


@dataclass
class Stack:
    """A decoder stack: its layers, sizes and the RoPE table for its positions."""

    layers: list[LayerWeights]
    norm: torch.Tensor
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    cos: torch.Tensor  # [positions, head_dim], model dtype
    sin: torch.Tensor  # the same, sign-flipped on the first half: rotate_half(x) * sin = roll(x) * this
    # RMSNorm's scalars as 0-dim float32 tensors on the weights' device: a Python number would be
    # wrapped into a new tensor at every call, a third of a small norm's time on a CPU.
    eps_t: torch.Tensor
    width_t: torch.Tensor  # hidden size: the mean's divisor for the layer norms
    head_dim_t: torch.Tensor  # the divisor for the q/k norms
    eps: float  # the same epsilon as a number, for `F.rms_norm`
    # Products run over at least this many rows (zero rows added): one of INVARIANT_ROW_PADDINGS on the
    # CPU, so a row's bits do not depend on its company; 1: as many as there are.
    min_rows: int = 1
    # Fewer kernels where each one is a launch (a GPU, bf16 or fp16; see `fewer_kernels_for`):
    # - each RMSNorm is `F.rms_norm` (aten's fused kernel on CUDA): 1 kernel instead of 9, the weight
    #   applied inside, so rounded once where qwen-tts rounds the normed value, then its product with
    #   the weight (the q/k norms, whose weight differs by head, apply it after: 2 kernels);
    # - RoPE's second product and the sum are one `addcmul` (rounded once, not twice), and each residual
    #   sum is its projection's own (`addmm_`, into a sum no one else reads); a sampled frame's draws are
    #   made for every id at once (`frame_noise`), not per token for its candidates;
    # - the talker's decode attention puts each KV head's query heads in the query-length axis instead of
    #   asking SDPA for GQA, with the mask as an additive bias made once per frame: a masked GQA call has
    #   no fused kernel (flash takes no mask, memory-efficient no GQA) and falls back to the math one.
    fewer_kernels: bool = False
    # Triton kernels in the steps and the prefill (`fused_kernels`; a GPU, checked usable at start-up): a layer's
    # q/k norm, RoPE and K/V cache writes are one kernel instead of seven, SiLU(gate) * up one instead of two
    # (sampling: `Weights.triton_sampling`).
    triton_kernels: bool = False
    # With them, the talker's decode attention as a Triton kernel over each row's live keys only
    # (`fused_kernels.decode_attention`): no mask, no length bucket, so one CUDA graph serves every length.
    triton_attention: bool = False
    # With it, fewer split programs, each looping over several splits (`fused_kernels.attention_programs`;
    # the same bits): an alternative the kit times beside it, not the service's.
    looped_attention: bool = False


@dataclass
class Weights:
    talker: Stack
    predictor: Stack
    codec_embedding: torch.Tensor  # talker's codec embedding [3072, H]
    codec_head: torch.Tensor  # [3072, H]
    codec_head_t: torch.Tensor  # its transposed view
    predictor_embeddings: list[torch.Tensor]  # 15 x [2048, H]
    predictor_heads_t: list[torch.Tensor]  # 15 x [Hc, 2048]: transposed views
    projection_t: torch.Tensor | None  # talker hidden -> predictor hidden, transposed (None: same size)
    projection_bias: torch.Tensor | None
    tts_pad: torch.Tensor  # [H]: added to every decode step's input (non-streaming text mode)
    suppress: torch.Tensor  # [3072] bool: codec control ids the talker may never emit
    eos_mask: torch.Tensor  # [3072] bool: only the end-of-speech id
    eos: int
    mixed_ids: torch.Tensor  # [3072] int64: the hashed ids of sampling.mixed_ids
    codebooks: torch.Tensor  # [16] int64: 0 to 15
    frame_offsets: torch.Tensor  # [16] int64: 0, then 1 for each code-predictor codebook (see frame_keys)
    # What sampling may leave out: a setting of the service, like the weights, since every request
    # shares its sampling settings. The default does all the work.
    sampler: SamplerPlan = SamplerPlan()
    # A sampled token without top-p drawn by one Triton kernel (`fused_kernels.sample_top_k`) instead of
    # about ten: with the Triton layer kernels, unless a benchmark times it apart (`with_fewer_kernels`).
    triton_sampling: bool = False


@dataclass
class SlotState:
    """Everything a request keeps on the device between steps, indexed by slot."""

    keys: list[torch.Tensor]  # per talker layer [slots, kv_heads, max_len, head_dim]
    values: list[torch.Tensor]
    predictor_keys: list[torch.Tensor]  # per predictor layer [slots, kv_heads, 16, head_dim]
    predictor_values: list[torch.Tensor]
    last_token: torch.Tensor  # [slots] long: the first codebook of the frame the next step completes
    past_hidden: torch.Tensor  # [slots, H]: the talker's last (normed) hidden state
    position: torch.Tensor  # [slots] long: where the next step writes its K/V
    generated: torch.Tensor  # [slots] long: first-codebook tokens sampled so far
    seen: torch.Tensor  # [slots, 3072] bool: for the repetition penalty
    active: torch.Tensor  # [slots] bool
    seed: torch.Tensor  # [slots] long
    do_sample: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    repetition_penalty: torch.Tensor
    sub_do_sample: torch.Tensor
    sub_temperature: torch.Tensor
    sub_top_k: torch.Tensor
    sub_top_p: torch.Tensor
    rows: torch.Tensor  # arange(slots)
    key_index: torch.Tensor  # arange(max_len)

    @property
    def slots(self) -> int:
        return int(self.rows.shape[0])

    @property
    def max_len(self) -> int:
        return int(self.key_index.shape[0])


# ---- building blocks ----------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """qwen-tts's RMSNorm, value for value (float32 inside, weight applied in the input dtype).

    `eps` and `width` (the last dimension's size) are 0-dim float32 tensors. `mean` is `sum` then
    `div_` by the width, and `pow(2)` is `x * x` (PyTorch's own special case), so the results are
    bit-identical with fewer dispatches."""
    x32 = x if x.dtype == torch.float32 else x.to(torch.float32)
    variance = (x32 * x32).sum(-1, keepdim=True).div_(width)
    x32 = x32 * variance.add_(eps).rsqrt_()
    return weight * (x32 if x.dtype == torch.float32 else x32.to(x.dtype))


def norm(x: torch.Tensor, weight: torch.Tensor, stack: Stack, width: torch.Tensor, tokens: int) -> torch.Tensor:
    """The stack's RMSNorm over the last dimension (`width` its size as a 0-dim tensor): `rms_norm`, or
    with `stack.fewer_kernels` as one kernel (see `Stack`). `tokens`: the rows qwen-tts would norm in one
    call for a request alone (its step's or prompt's tokens), whose order of sums the Triton kernel takes."""
    if stack.fewer_kernels:
        if stack.triton_kernels and weight.dim() == 1 and x.dim() == 2:  # rounded and summed as qwen-tts's
            return fused_kernels.rms_norm(x, weight, stack.eps, tokens)
        if weight.dim() == 1:  # the weight inside the kernel: rounded once
            return F.rms_norm(x, weight.shape, weight, stack.eps)
        return F.rms_norm(x, (x.shape[-1],), None, stack.eps) * weight  # a weight per head (q/k norms)
    return rms_norm(x, weight, stack.eps_t, width)


def linear(
    x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None, min_rows: int = 1
) -> torch.Tensor:
    """`F.linear` on 2-D rows, given the weight's transposed view: the same BLAS call `F.linear` makes
    (it folds [B, T, H] into [B * T, H] too), minus its wrapper's dispatches. Fewer than `min_rows` rows
    are padded with zero rows for the product (see INVARIANT_ROW_PADDINGS)."""
    rows = x.shape[0]
    if rows < min_rows:
        x = F.pad(x, (0, 0, 0, min_rows - rows))
    out = torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)
    return out if rows >= min_rows else out[:rows]


def _qkv_rows(x: torch.Tensor, length: int, layer: LayerWeights, stack: Stack) -> torch.Tensor:
    """The layer's input norm and fused QKV product: rows [B * T, H] -> [B * T, (heads + 2 * kv_heads) * D]."""
    normed = norm(x, layer.input_norm, stack, stack.width_t, length)
    return linear(normed, layer.qkv_t, layer.qkv_bias, stack.min_rows)


def _fused_attention_inputs(
    x: torch.Tensor,
    length: int,
    layer: LayerWeights,
    stack: Stack,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor | None,
    start: int,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """`stack.triton_kernels`' form of `_project_qkv` and the cache writes after it: q [B, heads, T, D], with
    k and v written to keys/values at slot = slots[row] (a prefill) or the row, and position =
    positions[row] (the talker's step, T = 1) or start + token (the code predictor and a prefill)."""
    qkv = _qkv_rows(x, length, layer, stack)
    return fused_kernels.qk_norm_rope_into_cache(
        qkv, length, layer.qk_norm, stack.cos, stack.sin, positions, start, keys, values, stack.heads,
        stack.kv_heads, stack.eps, slots,
    )  # fmt: skip


def _project_qkv(
    x: torch.Tensor, length: int, layer: LayerWeights, stack: Stack, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows [B * T, H] -> q [B, heads, T, D], k and v [B, kv_heads, T, D], RoPE applied. cos/sin:
    [B, T, 1, D]. Activations stay 2-D between layers, so each projection is one BLAS call.

    q and k are normed and rotated together (their norms differ only in weight), and rotate_half(x)
    is roll(x, D/2) against a sign-flipped sine: the same values as qwen-tts's, in fewer operations."""
    batch = x.shape[0] // length
    d = stack.head_dim
    qkv = _qkv_rows(x, length, layer, stack)
    qk, v = qkv.split([(stack.heads + stack.kv_heads) * d, stack.kv_heads * d], dim=-1)
    qk = norm(qk.view(batch, length, stack.heads + stack.kv_heads, d), layer.qk_norm, stack, stack.head_dim_t, length)
    if stack.fewer_kernels:
        qk = torch.addcmul(qk * cos, qk.roll(d // 2, dims=-1), sin)
    else:
        qk = qk * cos + qk.roll(d // 2, dims=-1) * sin
    q, k = qk.transpose(1, 2).split([stack.heads, stack.kv_heads], dim=1)
    v = v.view(batch, length, stack.kv_heads, d).transpose(1, 2)
    return q, k, v


def _finish_layer(
    x: torch.Tensor, attn: torch.Tensor, layer: LayerWeights, stack: Stack, owned: bool = False
) -> torch.Tensor:
    """Output projection, residual, MLP (SiLU-gated), residual. x: rows [B * T, H]; attn: [B, heads, T, D].
    `owned`: nothing else reads x (an earlier layer's output), so with `stack.fewer_kernels` the output
    projection may add to it in place; the MLP's sum always may (it is this function's own)."""
    attn = attn.transpose(1, 2).reshape(x.shape[0], -1)
    in_place = stack.fewer_kernels and x.shape[0] >= stack.min_rows
    if in_place and owned and layer.o_bias is None:
        x = x.addmm_(attn, layer.o_t)
    else:
        x = x + linear(attn, layer.o_t, layer.o_bias, stack.min_rows)
    normed = norm(x, layer.post_norm, stack, stack.width_t, attn.shape[-2])
    gate_up = linear(normed, layer.gate_up_t, None, stack.min_rows)
    if stack.triton_kernels:
        gated = fused_kernels.silu_mul(gate_up)
    else:
        gate, up = gate_up.split(stack.intermediate, dim=-1)
        gated = F.silu(gate) * up
    if in_place:
        return x.addmm_(gated, layer.down_t)
    return x + linear(gated, layer.down_t, None, stack.min_rows)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stack: Stack, **kwargs) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        q, k, v, scale=stack.head_dim**-0.5, enable_gqa=stack.heads != stack.kv_heads, **kwargs
    )


def _attend_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stack: Stack, mask: torch.Tensor) -> torch.Tensor:
    """One query per row (q [n, heads, 1, D]) over k, v [n, kv_heads, L, D]. `mask`: [n, 1, 1, L], boolean
    (True: visible), or with `stack.fewer_kernels` an additive bias in q's dtype; then the query
    heads sharing a KV head (qwen-tts's repeat_kv: head h reads KV head h // group) are that head's queries."""
    if not stack.fewer_kernels:
        return _attend(q, k, v, stack, attn_mask=mask)
    n, d = q.shape[0], stack.head_dim
    grouped = q.reshape(n, stack.kv_heads, stack.heads // stack.kv_heads, d)
    out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=d**-0.5)
    return out.reshape(n, stack.heads, 1, d)


def _attend_prompts(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stack: Stack, lengths: list[int]
) -> torch.Tensor:
    """Causal attention over right-padded prompts. Batch invariant (`stack.min_rows` > 1): each prompt over
    its own length, since the CPU's kernel blocks its sums by the sequence length, so a prompt attended at
    a longer neighbour's length would come out with other last bits than alone (outputs past a prompt's
    end are then zeros: no query of it looks there). Otherwise one call at the longest length."""
    if len(set(lengths)) == 1 or stack.min_rows == 1:
        return _attend(q, k, v, stack, is_causal=True)
    out = torch.zeros_like(q)
    for row, length in enumerate(lengths):
        part = slice(row, row + 1), slice(None), slice(0, length)
        out[part] = _attend(q[part], k[part], v[part], stack, is_causal=True)
    return out


def choose_first_codebook(
    w: Weights,
    logits: torch.Tensor,
    seen: torch.Tensor,
    generated: torch.Tensor,
    draws: Draws | None,
    do_sample: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    repetition_penalty: torch.Tensor,
) -> torch.Tensor:
    """The talker's logits rules as qwen-tts sets them for HF generate: repetition penalty over the
    row's own codes, codec control ids suppressed, no end of speech before the second token.
    `draws`: what this token's draws come from (`Draws`); None (every row greedy, known to the host) skips
    the sampling work."""
    penalty = repetition_penalty[:, None]
    logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    logits = logits.masked_fill(w.suppress[None, :], float("-inf"))
    logits = logits.masked_fill((generated < 2)[:, None] & w.eos_mask[None, :], float("-inf"))
    if draws is None:
        return logits.argmax(dim=-1)
    return _choose(w, logits, (do_sample, temperature, top_k, top_p), draws)


RowSettings = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # do_sample, temperature, top-k, top-p


def _choose(w: Weights, logits: torch.Tensor, settings: RowSettings, draws: Draws) -> torch.Tensor:
    """A sampled (or, per row, greedy) token: over the top candidates when the settings allow it; with
    the Triton kernels and no top-p, in one kernel (`fused_kernels.sample_top_k`, the same token)."""
    if w.sampler.candidates:
        if w.triton_sampling and draws.noise is not None and not w.sampler.top_p:
            do_sample, temperature, top_k, _ = settings
            plan = w.sampler
            return fused_kernels.sample_top_k(
                logits, draws.noise, temperature, top_k, do_sample, plan.candidates, plan.greedy_rows
            )
        return choose_among_top(logits, *settings, draws, w.mixed_ids, w.sampler)
    vocab = logits.shape[-1]
    if draws.noise is not None:
        return filter_and_choose(logits, *settings, None, draws.noise[:, :vocab])
    return filter_and_choose(logits, *settings, draws_from(draws.key, w.mixed_ids[:vocab]))


def _token_draws(keys: torch.Tensor, noise: torch.Tensor | None, column: int) -> Draws:
    """The draws of a frame's token `column` (see `frame_keys`, `frame_noise`)."""
    return Draws(keys[:, column]) if noise is None else Draws(noise=noise[:, column])


def frame_noise(w: Weights, keys: torch.Tensor) -> torch.Tensor:
    """The Gumbel noise of a frame's 16 tokens' draws for every id, [n, 16, V], from its keys [n, 16]
    (`frame_keys`): the values token-by-token sampling makes, in one set of kernels instead of one per
    token (`Stack.fewer_kernels`; on a CPU the candidates' draws alone cost less)."""
    return gumbel_noise(draws_from(keys.reshape(-1), w.mixed_ids)).view(keys.shape[0], keys.shape[1], -1)


def frame_keys(w: Weights, seed: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Each row's draw keys for one frame step, [n, 16], all hashed at once: column 0 for the talker's
    next token (counter `generated`), columns 1 to 15 for the code predictor's codebooks of the frame
    being completed (counter `generated - 1`)."""
    return row_keys(seed[:, None], generated[:, None] - w.frame_offsets[None, :], w.codebooks[None, :])


# ---- the frame function -------------------------------------------------------------------------


def _predict_codes(
    w: Weights,
    s: SlotState,
    n: int,
    talker_embed: torch.Tensor,
    draw_keys: torch.Tensor | None,
    noise: torch.Tensor | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The code predictor's 15 residual codebooks for rows [:n], unrolled over its per-frame cache.
    Returns the 15 codes and their embeddings in the talker's space; writes nothing but that cache."""
    stack = w.predictor

    def project(x: torch.Tensor) -> torch.Tensor:
        return x if w.projection_t is None else linear(x, w.projection_t, w.projection_bias, stack.min_rows)

    x = project(torch.stack((s.past_hidden[:n], talker_embed), dim=1).view(2 * n, -1))  # rows [n * 2, Hc]
    embeds: list[torch.Tensor] = []
    codes: list[torch.Tensor] = []
    for step in range(NUM_CODE_GROUPS - 1):
        start, length = (0, 2) if step == 0 else (step + 1, 1)
        cos = stack.cos[start : start + length][None, :, None]
        sin = stack.sin[start : start + length][None, :, None]
        layers = zip(stack.layers, s.predictor_keys, s.predictor_values, strict=True)
        for index, (layer, keys, values) in enumerate(layers):
            if stack.triton_kernels:
                q = _fused_attention_inputs(x, length, layer, stack, keys, values, None, start)
            else:
                q, k, v = _project_qkv(x, length, layer, stack, cos, sin)
                keys[:n, :, start : start + length] = k
                values[:n, :, start : start + length] = v
            end = start + length
            attn = _attend(q, keys[:n, :, :end], values[:n, :, :end], stack, is_causal=step == 0)
            x = _finish_layer(x, attn, layer, stack, owned=index > 0)  # the first's x may be an embedding
        hidden = norm(x if length == 1 else x.view(n, length, -1)[:, -1], stack.norm, stack, stack.width_t, length)
        logits = linear(hidden, w.predictor_heads_t[step], None, stack.min_rows).to(torch.float32)
        if draw_keys is not None:
            settings = (s.sub_do_sample[:n], s.sub_temperature[:n], s.sub_top_k[:n], s.sub_top_p[:n])
            code = _choose(w, logits, settings, _token_draws(draw_keys, noise, step + 1))
        else:
            code = logits.argmax(dim=-1)
        codes.append(code)
        embed = F.embedding(code, w.predictor_embeddings[step])  # [n, H]
        embeds.append(embed)
        if step < NUM_CODE_GROUPS - 2:
            x = project(embed)
    return codes, embeds


def frame_step(w: Weights, s: SlotState, n: int, kv_len: int, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance rows (= slots) [:n] by one codec frame.

    Completes each row's frame (its pending first-codebook token plus 15 predicted codes), runs one
    talker step on it and picks the next first-codebook token. `kv_len` bounds the keys attended to and
    must exceed every active row's position (with `Stack.triton_attention` each row reads its own live
    keys and `kv_len` is not read); `sample=False` when no row samples (greedy only).
    Returns frames [n, 16] and done [n] (next token is end of speech). Rows that are not active
    compute harmlessly inside their own slot. `n`, `kv_len` and `sample` are shapes and switches
    the host knows; everything per row lives on the device.
    """
    stack = w.talker
    token = s.last_token[:n]
    position = s.position[:n]
    talker_embed = F.embedding(token, w.codec_embedding)  # [n, H]
    generated = s.generated[:n]
    draw_keys = frame_keys(w, s.seed[:n], generated) if sample else None
    noise = frame_noise(w, draw_keys) if draw_keys is not None and stack.fewer_kernels else None
    codes, embeds = _predict_codes(w, s, n, talker_embed, draw_keys, noise)
    x = torch.stack([talker_embed, *embeds], dim=1).sum(dim=1) + w.tts_pad  # rows [n, H]

    if not stack.triton_kernels:  # (the Triton kernel reads the tables at each row's position)
        cos = stack.cos[position][:, None, None]  # [n, 1, 1, D]: one position per row
        sin = stack.sin[position][:, None, None]
    rows = s.rows[:n]
    if not stack.triton_attention:  # (which reads each row's live keys, unmasked)
        visible = (s.key_index[:kv_len][None, :] <= position[:, None])[:, None, None]  # [n, 1, 1, kv_len]
        if stack.fewer_kernels:
            bias = torch.full(visible.shape, float("-inf"), dtype=x.dtype, device=x.device)
            visible = bias.masked_fill_(visible, 0.0)
    for index, (layer, keys, values) in enumerate(zip(stack.layers, s.keys, s.values, strict=True)):
        if stack.triton_kernels:
            q = _fused_attention_inputs(x, 1, layer, stack, keys, values, position, 0)
        else:
            q, k, v = _project_qkv(x, 1, layer, stack, cos, sin)
            keys[rows, :, position] = k[:, :, 0]
            values[rows, :, position] = v[:, :, 0]
        if stack.triton_attention:
            attn = fused_kernels.decode_attention(
                q, keys, values, position, stack.head_dim**-0.5, stack.looped_attention
            )
        else:
            attn = _attend_decode(q, keys[:n, :, :kv_len], values[:n, :, :kv_len], stack, visible)
        x = _finish_layer(x, attn, layer, stack, owned=index > 0)
    hidden = norm(x, stack.norm, stack, stack.width_t, 1)  # [n, H]
    logits = linear(hidden, w.codec_head_t, None, w.talker.min_rows).to(torch.float32)
    next_token = choose_first_codebook(
        w,
        logits,
        s.seen[:n],
        generated,
        None if draw_keys is None else _token_draws(draw_keys, noise, 0),
        s.do_sample[:n],
        s.temperature[:n],
        s.top_k[:n],
        s.top_p[:n],
        s.repetition_penalty[:n],
    )
    frame = torch.stack([token, *codes], dim=1)
    done = next_token == w.eos

    s.last_token[:n] = next_token
    s.past_hidden[:n] = hidden
    s.seen[:n].scatter_(1, next_token[:, None], True)
    s.generated[:n] = generated + 1
    s.position[:n] = torch.clamp(position + s.active[:n].to(position.dtype), max=s.max_len - 1)
    return frame, done


# ---- building the weights and state from a loaded qwen-tts model ---------------------------------


def _fuse(modules: Sequence[torch.nn.Linear], contiguous: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One transposed weight ([in, out]) for several linears on the same input, and their bias; the
    modules are re-pointed at views of it, so qwen-tts's own forward still works and no memory is
    doubled. `contiguous`: held as [in, out] in memory (see `_transposed`)."""
    weight = torch.cat([m.weight.detach() for m in modules], dim=0)
    has_bias = [m.bias is not None for m in modules]
    bias = torch.cat([m.bias.detach() for m in modules], dim=0) if all(has_bias) else None
    if any(has_bias) and bias is None:
        raise ValueError("cannot fuse linears of which only some have a bias")
    weight_t = weight.t().contiguous() if contiguous else weight.t()
    start = 0
    for module in modules:
        rows = module.weight.shape[0]
        module.weight = torch.nn.Parameter(weight_t[:, start : start + rows].t(), requires_grad=False)
        if bias is not None:
            module.bias = torch.nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
    return weight_t, bias


def _transposed(module: torch.nn.Linear, contiguous: bool) -> torch.Tensor:
    """A linear's weight as [in, out] for `linear`: a view of the model's [out, in] weight, or
    (`contiguous`) a contiguous copy that the module is re-pointed at, so memory is not doubled. Which one
    keeps a row's bits whatever the row count depends on the CPU (`batch_invariance`)."""
    if not contiguous:
        return module.weight.detach().t()
    weight_t = module.weight.detach().t().contiguous()
    module.weight = torch.nn.Parameter(weight_t.t(), requires_grad=False)
    return weight_t


def _layer_products(layer: torch.nn.Module) -> dict[str, list[torch.nn.Linear]]:
    """A decoder layer's products, each a group of linears on one input that the step multiplies as one."""
    attn, mlp = layer.self_attn, layer.mlp
    return {
        "qkv": [attn.q_proj, attn.k_proj, attn.v_proj],
        "o": [attn.o_proj],
        "gate_up": [mlp.gate_proj, mlp.up_proj],
        "down": [mlp.down_proj],
    }


def _head_products(talker: torch.nn.Module) -> dict[str, list[torch.nn.Linear]]:
    """The heads' products (and the code predictor's input projection, where it has one)."""
    predictor = talker.code_predictor
    heads = {"codec_head": [talker.codec_head]}
    heads |= {f"predictor_head_{k}": [head] for k, head in enumerate(predictor.lm_head)}
    if not isinstance(predictor.small_to_mtp_projection, torch.nn.Identity):
        heads["projection"] = [predictor.small_to_mtp_projection]
    return heads


def product_shapes(model: torch.nn.Module) -> list[ProductShape]:
    """The distinct shapes the frame step multiplies by (the groups `build_weights` fuses)."""
    talker = model.talker
    groups = [
        group
        for stack in (talker.model, talker.code_predictor.model)
        for layer in stack.layers
        for group in _layer_products(layer).values()
    ]
    groups += _head_products(talker).values()
    shapes: list[ProductShape] = []
    for group in groups:
        shape = ProductShape(group[0].in_features, sum(m.out_features for m in group), group[0].bias is not None)
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def _layer_weights(layer: torch.nn.Module, contiguous: bool) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    if getattr(mlp, "act_fn", None).__class__.__name__ not in ("SiLU", "SiLUActivation"):
        raise ValueError(f"unsupported activation {mlp.act_fn!r}: the frame step assumes SiLU")
    products = _layer_products(layer)
    qkv_t, qkv_bias = _fuse(products["qkv"], contiguous)
    gate_up_t, _ = _fuse(products["gate_up"], contiguous)
    (o_proj,), (down_proj,) = products["o"], products["down"]
    heads = attn.q_proj.weight.shape[0] // attn.head_dim
    kv_heads = attn.k_proj.weight.shape[0] // attn.head_dim
    qk_norm = torch.cat(
        [attn.q_norm.weight.detach().expand(heads, -1), attn.k_norm.weight.detach().expand(kv_heads, -1)]
    )
    return LayerWeights(
        input_norm=layer.input_layernorm.weight.detach(),
        qkv_t=qkv_t,
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        o_t=_transposed(o_proj, contiguous),
        o_bias=None if o_proj.bias is None else o_proj.bias.detach(),
        post_norm=layer.post_attention_layernorm.weight.detach(),
        gate_up_t=gate_up_t,
        down_t=_transposed(down_proj, contiguous),
    )


def _stack(model: torch.nn.Module, config, cos: torch.Tensor, sin: torch.Tensor, contiguous: bool) -> Stack:
    layers = [_layer_weights(layer, contiguous) for layer in model.layers]
    half = cos.shape[-1] // 2
    sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    head_dim = int(getattr(config, "head_dim", config.hidden_size // config.num_attention_heads))

    def scalar(value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.float32, device=cos.device)

    return Stack(
        layers=layers,
        norm=model.norm.weight.detach(),
        heads=int(config.num_attention_heads),
        kv_heads=int(config.num_key_value_heads),
        head_dim=head_dim,
        intermediate=int(layers[0].gate_up_t.shape[1] // 2),
        cos=cos,
        sin=sin,
        eps_t=scalar(float(model.norm.variance_epsilon)),
        eps=float(model.norm.variance_epsilon),
        width_t=scalar(model.norm.weight.shape[0]),
        head_dim_t=scalar(head_dim),
    )


def fewer_kernels_for(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the step takes `Stack`'s kernel-saving forms: on a GPU, where each kernel is a launch, in a
    half-precision dtype; float32 keeps qwen-tts's own ops (GPU equality checks against it run there)."""
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)


@torch.inference_mode()
def build_weights(
    model: torch.nn.Module,
    max_len: int,
    tts_pad: torch.Tensor,
    min_rows: int = 1,
    contiguous: bool = False,
    fewer_kernels: bool = False,
) -> Weights:
    """Views of a loaded `Qwen3TTSForConditionalGeneration`'s weights for the frame step.

    `tts_pad` is qwen-tts's projected pad text embedding ([H]), built by the prompt builder. `min_rows`:
    the fewest rows a product runs over (`Stack.min_rows`). `contiguous`: the products' weights are held
    as contiguous [in, out] matrices (the model's modules re-pointed at them) rather than as transposed
    views of the model's own; `batch_invariance` measures which keeps a row's bits on this CPU.
    `fewer_kernels`: `Stack.fewer_kernels` (see `fewer_kernels_for`).
    """
    talker = model.talker
    config = model.config.talker_config
    dtype = talker.codec_head.weight.dtype
    device = talker.codec_head.weight.device

    # RoPE tables from the model's own rotary modules. The talker's is 3-D (MRoPE) but all three
    # position grids are equal for text and codec tokens, so its interleaving picks equal values.
    probe = torch.zeros(1, dtype=dtype, device=device)
    positions = torch.arange(max_len, device=device)
    cos3, sin3 = talker.model.rotary_emb(probe, positions.view(1, 1, -1).expand(3, 1, -1))
    # Equal up to rounding: the three sections' cosines are one elementwise call over [3, positions, D],
    # split between threads, and a chunk's vector tail may round its last bit otherwise (seen once in
    # 2026-12-06's suite on a Sapphire Rapids, then not again); the step uses the first section's.
    tolerance = 4 * torch.finfo(dtype).eps
    if not all(torch.allclose(cos3[0], cos3[k], rtol=0, atol=tolerance) for k in (1, 2)):
        raise ValueError("the talker's RoPE sections differ for equal positions; the frame step cannot use it")
    predictor = talker.code_predictor
    pcos, psin = predictor.model.rotary_emb(probe, torch.arange(NUM_CODE_GROUPS, device=device).view(1, -1))

    projection = predictor.small_to_mtp_projection
    vocab = int(config.vocab_size)
    eos = int(config.codec_eos_token_id)
    suppress = torch.zeros(vocab, dtype=torch.bool, device=device)
    suppress[vocab - 1024 :] = True  # qwen-tts's suppress_tokens: the top 1024 ids, except end of speech
    suppress[eos] = False
    eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    eos_mask[eos] = True
    heads = {name: _transposed(group[0], contiguous) for name, group in _head_products(talker).items()}
    codec_head_t = heads["codec_head"]
    weights = Weights(
        talker=replace(_stack(talker.model, config, cos3[0, 0], sin3[0, 0], contiguous), min_rows=min_rows),
        predictor=replace(
            _stack(predictor.model, config.code_predictor_config, pcos[0], psin[0], contiguous), min_rows=min_rows
        ),
        codec_embedding=talker.model.codec_embedding.weight.detach(),
        codec_head_t=codec_head_t,
        codec_head=codec_head_t.t(),
        predictor_embeddings=[e.weight.detach() for e in predictor.model.codec_embedding],
        predictor_heads_t=[heads[f"predictor_head_{k}"] for k in range(len(predictor.lm_head))],
        projection_t=heads.get("projection"),
        projection_bias=None if isinstance(projection, torch.nn.Identity) else projection.bias.detach(),
        tts_pad=tts_pad.reshape(-1).detach(),
        suppress=suppress,
        eos_mask=eos_mask,
        eos=eos,
        mixed_ids=mixed_ids(max(vocab, int(config.code_predictor_config.vocab_size)), device),
        codebooks=torch.arange(NUM_CODE_GROUPS, device=device),
        frame_offsets=(torch.arange(NUM_CODE_GROUPS, device=device) > 0).long(),
    )
    return with_fewer_kernels(weights, fewer_kernels)


def sizes(w: Weights) -> list[tuple[int, int, int, int, int]]:
    """Each stack's heads, KV heads, head size, MLP width and hidden size (what `fused_kernels.usable` checks)."""
    return [
        (stack.heads, stack.kv_heads, stack.head_dim, stack.intermediate, int(stack.layers[0].input_norm.shape[0]))
        for stack in (w.talker, w.predictor)
    ]


def vocabularies(w: Weights) -> list[int]:
    """The talker's and the code predictor's vocabulary sizes (the sampled tokens' logits)."""
    return [int(w.codec_head_t.shape[1]), int(w.predictor_heads_t[0].shape[1])]


def kernel_forms(w: Weights) -> str:
    """The step's forms in words, for the start-up log."""
    if not w.talker.fewer_kernels:
        return "qwen-tts's ops"
    attention = "Triton decode attention over live keys" if w.talker.triton_attention else "grouped decode attention"
    if w.talker.looped_attention:
        attention += " (looped splits)"
    triton = ", Triton q/k norm + RoPE + cache writes, SiLU-mul" if w.talker.triton_kernels else ""
    if w.triton_sampling:
        triton += " and sampling" if triton else ", Triton sampling"
    return f"fewer (fused norms, {attention}{triton})"


def with_fewer_kernels(
    w: Weights,
    fewer: bool = True,
    triton: bool = False,
    triton_sampling: bool | None = None,
    triton_attention: bool | None = None,
    looped_attention: bool = False,
) -> Weights:
    """`w` with `Stack.fewer_kernels`, `Stack.triton_kernels`, `Weights.triton_sampling` and the talker's
    `Stack.triton_attention` (these two by default as `triton`; the attention only with `triton`, whose
    q/k kernel lays q out as it reads it) and `Stack.looped_attention` (only with the attention) on or off
    (the same tensors)."""
    forms = {"fewer_kernels": fewer, "triton_kernels": triton}
    sampling = triton if triton_sampling is None else triton_sampling
    attention = triton and (triton if triton_attention is None else triton_attention)
    looped = attention and looped_attention
    return replace(
        w,
        talker=replace(w.talker, **forms, triton_attention=attention, looped_attention=looped),
        predictor=replace(w.predictor, **forms),
        triton_sampling=sampling,
    )


def allocate_state(w: Weights, slots: int, max_len: int) -> SlotState:
    """Zeroed per-slot buffers; the talker's KV is the big one (see `kv_bytes_per_slot`). On the CPU the KV
    is memory the kernel zeroes page by page when it is first touched (`untouched_zeros`)."""
    t, p = w.talker, w.predictor
    dtype, device = w.codec_head.dtype, w.codec_head.device
    vocab = w.codec_head.shape[0]

    def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=device)

    kv = zeros if device.type != "cpu" else untouched_zeros
    return SlotState(
        keys=[kv(slots, t.kv_heads, max_len, t.head_dim, dtype=dtype) for _ in t.layers],
        values=[kv(slots, t.kv_heads, max_len, t.head_dim, dtype=dtype) for _ in t.layers],
        predictor_keys=[zeros(slots, p.kv_heads, NUM_CODE_GROUPS, p.head_dim, dtype=dtype) for _ in p.layers],
        predictor_values=[zeros(slots, p.kv_heads, NUM_CODE_GROUPS, p.head_dim, dtype=dtype) for _ in p.layers],
        last_token=zeros(slots),
        past_hidden=zeros(slots, w.codec_head.shape[1], dtype=dtype),
        position=zeros(slots),
        generated=zeros(slots),
        seen=zeros(slots, vocab, dtype=torch.bool),
        active=zeros(slots, dtype=torch.bool),
        seed=zeros(slots),
        do_sample=zeros(slots, dtype=torch.bool),
        temperature=torch.ones(slots, device=device),
        top_k=zeros(slots),
        top_p=torch.ones(slots, device=device),
        repetition_penalty=torch.ones(slots, device=device),
        sub_do_sample=zeros(slots, dtype=torch.bool),
        sub_temperature=torch.ones(slots, device=device),
        sub_top_k=zeros(slots),
        sub_top_p=torch.ones(slots, device=device),
        rows=torch.arange(slots, device=device),
        key_index=torch.arange(max_len, device=device),
    )


def untouched_zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor in fresh anonymous memory (page-aligned), which the kernel zeroes a page at a time
    when it is first touched. `torch.zeros` writes every page at once: the 1.7B model's KV at 32 slots
    (11.5 GB) took 21 s of every start on a 2-core EPYC, and kept that much memory resident before any
    request had used it; a slot's pages now become resident as its positions are written."""
    count = math.prod(shape)
    if count == 0 or os.name != "posix":  # (Windows' mmap takes no flags)
        return torch.zeros(shape, dtype=dtype)
    # private: a page only read (an idle row's keys) maps the kernel's one zero page; shared anonymous memory
    # would allocate it, and keep it after MADV_DONTNEED
    memory = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # a first write must not take a 2 MB huge page (THP "always")
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(memory, dtype=dtype, count=count).view(shape)


def return_pages(tensor: torch.Tensor) -> None:
    """Give the whole pages inside a contiguous CPU tensor back to the kernel (MADV_DONTNEED): they read as
    zeros again and take no memory until written. A left request's KV slot, so that the memory it holds
    follows its requests (`kv_memory`); what a slot holds is never read before its next prefill writes it."""
    if _LIBC is None or tensor.device.type != "cpu":
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    first, end = -(-start // page) * page, (start + tensor.numel() * tensor.element_size()) // page * page
    if end > first and _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), mmap.MADV_DONTNEED):
        logger.warning("madvise(MADV_DONTNEED) failed: %s", os.strerror(ctypes.get_errno()))


_LIBC = ctypes.CDLL(None, use_errno=True) if os.name == "posix" and hasattr(mmap, "MADV_DONTNEED") else None


def _kv_bytes(layers: int, kv_heads: int, head_dim: int, element_size: int, positions: int) -> int:
    return 2 * layers * kv_heads * positions * head_dim * element_size


def kv_bytes_per_slot(w: Weights, max_len: int) -> int:
    t = w.talker
    return _kv_bytes(len(t.layers), t.kv_heads, t.head_dim, w.codec_head.element_size(), max_len)


def talker_kv_bytes(model: Any, positions: int) -> int:
    """`kv_bytes_per_slot` from a loaded Qwen3TTSModel's talker config, before its weights are built."""
    config = model.model.config.talker_config
    head_dim = int(getattr(config, "head_dim", config.hidden_size // config.num_attention_heads))
    size = model.model.talker.codec_head.weight.element_size()
    return _kv_bytes(int(config.num_hidden_layers), int(config.num_key_value_heads), head_dim, size, positions)


def kv_pages_bytes(w: Weights, positions: int) -> int:
    """The memory a slot's first `positions` positions take on the CPU: each layer's keys and values keep a
    head's positions together, in whole pages."""
    t = w.talker
    run = -(-positions * t.head_dim * w.codec_head.element_size() // mmap.PAGESIZE) * mmap.PAGESIZE
    return 2 * len(t.layers) * t.kv_heads * run


# ---- prefill: joining requests ------------------------------------------------------------------


@torch.inference_mode()
def prefill(
    w: Weights, s: SlotState, slots: Sequence[int], prompts: Sequence[torch.Tensor], params: Sequence[SamplingParams]
) -> None:
    """Run the talker over each joining request's prompt ([T_i, H] each), batched and right-padded,
    writing K/V straight into its slot; pick its first token and reset its per-slot state.
    Touches only the given slots."""
    device, dtype = w.codec_head.device, w.codec_head.dtype
    lengths = [int(p.shape[0]) for p in prompts]
    longest = max(lengths)
    if longest >= s.max_len:
        raise ValueError(f"prompt of {longest} tokens does not fit the {s.max_len}-position KV slots")
    x = torch.zeros(len(prompts), longest, prompts[0].shape[-1], dtype=dtype, device=device)
    for row, prompt in enumerate(prompts):
        x[row, : prompt.shape[0]] = prompt
    # Every small per-request value reaches the device in two copies, integers and floats, from pinned memory
    # on a GPU: a tensor made on the device from Python data is a blocking copy, which would wait for the step
    # in flight (and for this prefill's own layers) once per value.
    integers, floats = prefill_values(slots, lengths, params)
    prefill_rows(w, s, x, host_to_device(integers, device), host_to_device(floats, device), lengths)


def prefill_values(
    slots: Sequence[int], lengths: Sequence[int], params: Sequence[SamplingParams]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The joining rows' slots, lengths and sampling settings as two host tensors, [8, rows] integers and
    [5, rows] floats, in the order `prefill_rows` reads them."""
    integers = [
        list(slots),
        [length - 1 for length in lengths],
        list(lengths),
        [p.seed for p in params],
        [p.do_sample for p in params],
        [p.top_k for p in params],
        [p.sub_do_sample for p in params],
        [p.sub_top_k for p in params],
    ]
    floats = [[getattr(p, name) for p in params] for name in _PREFILL_FLOATS]
    return torch.tensor(integers, dtype=torch.long), torch.tensor(floats, dtype=torch.float32)


_PREFILL_FLOATS = ("temperature", "top_p", "repetition_penalty", "sub_temperature", "sub_top_p")


@torch.inference_mode()
def prefill_rows(
    w: Weights, s: SlotState, x: torch.Tensor, integers: torch.Tensor, floats: torch.Tensor, lengths: Sequence[int]
) -> None:
    """The device part of `prefill`: x [rows, T, H] right-padded prompts, `integers` and `floats` from
    `prefill_values` on the device. No host sync and no tensor from Python data, so one prompt's prefill at
    a fixed T can be captured as a CUDA graph (`cuda_graphs.GraphedPrefill`); `lengths` only chooses how
    prompts of different lengths are attended (one row needs none but its own)."""
    stack = w.talker
    rows, longest = x.shape[0], x.shape[1]
    index, last, length, seed, do_sample, top_k, sub_do_sample, sub_top_k = integers.unbind(0)
    temperature, top_p, repetition_penalty, sub_temperature, sub_top_p = floats.unbind(0)
    cos, sin = stack.cos[:longest][None, :, None], stack.sin[:longest][None, :, None]
    x = x.reshape(rows * longest, -1)
    for number, (layer, keys, values) in enumerate(zip(stack.layers, s.keys, s.values, strict=True)):
        # right padding lands beyond each prompt, where no query looks
        if stack.triton_kernels:  # k and v written by the kernel, then read back for the prompts' attention
            q = _fused_attention_inputs(x, longest, layer, stack, keys, values, None, 0, index)
            k, v = keys[index, :, :longest], values[index, :, :longest]
        else:
            q, k, v = _project_qkv(x, longest, layer, stack, cos, sin)
            keys[index, :, :longest] = k
            values[index, :, :longest] = v
        x = _finish_layer(x, _attend_prompts(q, k, v, stack, list(lengths)), layer, stack, owned=number > 0)
    x = x.view(rows, longest, -1)
    hidden = norm(x[s.rows[:rows], last], stack.norm, stack, stack.width_t, longest)
    logits = linear(hidden, w.codec_head_t, None, w.talker.min_rows).to(torch.float32)

    per_slot = {
        "seed": seed,
        "do_sample": do_sample.bool(),
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "repetition_penalty": repetition_penalty,
        "sub_do_sample": sub_do_sample.bool(),
        "sub_temperature": sub_temperature,
        "sub_top_k": sub_top_k,
        "sub_top_p": sub_top_p,
    }
    for name, value in per_slot.items():
        getattr(s, name)[index] = value
    seen = torch.zeros(rows, s.seen.shape[1], dtype=torch.bool, device=x.device)
    generated = torch.zeros(rows, dtype=torch.long, device=x.device)
    first = choose_first_codebook(
        w,
        logits,
        seen,
        generated,
        Draws(row_keys(per_slot["seed"], generated, w.codebooks[0])),
        per_slot["do_sample"],
        per_slot["temperature"],
        per_slot["top_k"],
        per_slot["top_p"],
        per_slot["repetition_penalty"],
    )
    s.seen[index] = seen.scatter(1, first[:, None], True)
    s.generated[index] = generated + 1
    s.last_token[index] = first
    s.past_hidden[index] = hidden
    s.position[index] = length
    s.active.index_fill_(0, index, True)


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; on a GPU through pinned memory without blocking, where a plain copy of
    pageable memory waits for the stream (the step in flight)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def copy_from_host(target: torch.Tensor, tensor: torch.Tensor) -> None:
    """`target.copy_(tensor)` from the host, as `host_to_device` sends it (a graph's static input)."""
    if target.device.type != "cuda":
        target.copy_(tensor)
    else:
        target.copy_(tensor.pin_memory(), non_blocking=True)


# Per-slot state a request carries from step to step (besides its K/V); the predictor's cache is
# rebuilt every frame, so it is not among them.
_CARRIED = (
    "last_token",
    "past_hidden",
    "position",
    "generated",
    "seen",
    "active",
    "seed",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "sub_do_sample",
    "sub_temperature",
    "sub_top_k",
    "sub_top_p",
)


@torch.inference_mode()
def move(s: SlotState, source: int, target: int, length: int) -> None:
    """Compaction: a running request moves from `source` to the free slot `target`, so that the step window
    (rows [:n]) shrinks when requests below it have left. Copies its own K/V (the first `length` positions,
    all it has written) and its per-slot state; `source` becomes free. No other slot is read or written,
    and its next frames are the ones it would have made in place (its draws are keyed by seed and frame,
    not slot)."""
    for cache in (*s.keys, *s.values):
        cache[target, :, :length] = cache[source, :, :length]
    for name in _CARRIED:
        tensor = getattr(s, name)
        tensor[target] = tensor[source]
    release(s, source)


def release(s: SlotState, slot: int) -> None:
    """A request left (or moved): its slot stops advancing and goes back to position 0. A free slot inside
    the step's window (a graph's batch bucket rounds the window up) is still computed as an idle row, and
    the Triton decode attention reads a row's keys up to its position: at its old one an idle row would
    read all the keys its last request wrote, every step. On the CPU its cache's pages go back to the kernel
    (`return_pages`); the next prefill resets the rest."""
    s.active[slot] = False
    s.position[slot] = 0
    for cache in (*s.keys, *s.values):
        return_pages(cache[slot])
