"""Token choice on the device, per row, with no host sync: the rules of qwen-tts's HF `generate` calls.

Every row carries its own settings (greedy or sampled, temperature, top-k, top-p) and its own seed.
Randomness is counter-based: the uniform number for (seed, frame, codebook, vocabulary id) is a hash of
those four integers, so a row's draws do not depend on which other rows share the batch, how large
the batch is, or the order rows joined. Sampling is Gumbel-max over the filtered logits, which draws
from the same distribution as HF's softmax + multinomial.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # odd multiplier below 2**31: products of 32-bit values stay inside int64


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two xor-shift-multiply rounds) on int64 tensors holding values < 2**32."""
    x = ((x >> 16) ^ x) * _MIX & MASK32
    x = ((x >> 16) ^ x) * _MIX & MASK32
    return (x >> 16) ^ x


def uniform(seed: torch.Tensor, counter: torch.Tensor, codebook: int, vocab: int) -> torch.Tensor:
    """Uniform floats in (0, 1), shape [rows, vocab], from per-row int64 `seed` and `counter` tensors."""
    ids = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    seed_lo, seed_hi = seed & MASK32, (seed >> 32) & MASK32
    key = _mix32(seed_lo ^ _mix32(seed_hi ^ _mix32((counter & MASK32) ^ (codebook * 0x9E3779B1 & MASK32))))
    return unit_interval(_mix32(key[:, None] ^ _mix32(ids[None, :])))


def unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """32-bit values -> floats strictly inside (0, 1): the top 23 bits plus a half, times 2**-23. Every
    such value is exact in float32 (with 24 bits, 2**24 - 1 + 0.5 rounds up to 2**24, i.e. u = 1.0,
    whose Gumbel noise is +inf: a suppressed token's -inf logit plus it is NaN, which argmax picks)."""
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


@dataclass
class SamplingParams:
    """One request's settings; `seed` makes its sampled audio reproducible."""

    do_sample: bool
    temperature: float
    top_k: int  # 0: off
    top_p: float
    repetition_penalty: float
    sub_do_sample: bool
    sub_temperature: float
    sub_top_k: int
    sub_top_p: float
    seed: int


def filter_and_choose(
    logits: torch.Tensor,
    do_sample: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """Greedy rows take the argmax; sampled rows apply temperature, top-k and top-p as HF's warpers do,
    then draw by Gumbel-max. `logits` is float32 [rows, vocab]; the other tensors are per row."""
    vocab = logits.shape[-1]
    greedy = logits.argmax(dim=-1)
    scaled = logits / temperature[:, None]
    # Top-k (HF TopKLogitsWarper): drop everything below the k-th largest value; k = 0 means off.
    k = top_k.clamp(max=vocab).masked_fill(top_k <= 0, vocab)
    descending = scaled.sort(dim=-1, descending=True).values
    kth = descending.gather(1, (k - 1)[:, None])
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    # Top-p (HF TopPLogitsWarper): in ascending order, drop the tokens whose cumulative probability is
    # at most 1 - top_p, always keeping the largest.
    ascending, order = scaled.sort(dim=-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    not_largest = torch.arange(vocab, device=logits.device) < vocab - 1
    drop_sorted = (cumulative <= (1 - top_p)[:, None]) & not_largest
    drop = drop_sorted.scatter(1, order, drop_sorted)
    scaled = scaled.masked_fill(drop, float("-inf"))
    gumbel = -torch.log(-torch.log(uniforms))
    sampled = (scaled + gumbel).argmax(dim=-1)
    return torch.where(do_sample, sampled, greedy)
