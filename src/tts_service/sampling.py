"""Token choice on the device, per row, with no host sync: the rules of qwen-tts's HF `generate` calls.

Every row carries its own settings (greedy or sampled, temperature, top-k, top-p) and its own seed.
Randomness is counter-based: the uniform number for (seed, frame, codebook, vocabulary id) is a hash of
those four integers, so a row's draws do not depend on which other rows share the batch, how large
the batch is, or the order rows joined. Sampling is Gumbel-max over the filtered logits, which draws
from the same distribution as HF's softmax + multinomial.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # odd multiplier below 2**31: products of 32-bit values stay inside int64


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two xor-shift-multiply rounds) on int64 tensors holding values < 2**32."""
    x = ((x >> 16) ^ x) * _MIX & MASK32
    x = ((x >> 16) ^ x) * _MIX & MASK32
    return (x >> 16) ^ x


def row_keys(seed: torch.Tensor, counter: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Each row's key for its draws at (`counter`, `codebook`): int64 tensors that broadcast together,
    such as seeds [rows, 1], counters [rows, C] and codebooks [C], for C draws of a frame at once."""
    seed_lo, seed_hi = seed & MASK32, (seed >> 32) & MASK32
    return _mix32(seed_lo ^ _mix32(seed_hi ^ _mix32((counter & MASK32) ^ (codebook * 0x9E3779B1 & MASK32))))


def mixed_ids(vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The hashed vocabulary ids that `draws_from` combines with a row's key: a table, built once."""
    return _mix32(torch.arange(vocab, device=device, dtype=torch.int64))


def draws_from(key: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    """Uniform floats in (0, 1) from per-row keys [rows] and hashed ids (`mixed_ids`, or entries of it):
    [vocab] for every row, or [rows, K] per row. An id's draw is the same whichever other ids are drawn."""
    return unit_interval(_mix32(key[:, None] ^ (mixed if mixed.dim() == 2 else mixed[None, :])))


def uniform(seed: torch.Tensor, counter: torch.Tensor, codebook: int, vocab: int) -> torch.Tensor:
    """Uniform floats in (0, 1), shape [rows, vocab], from per-row int64 `seed` and `counter` tensors."""
    key = row_keys(seed, counter, torch.tensor(codebook, dtype=torch.int64, device=seed.device))
    return draws_from(key, mixed_ids(vocab, seed.device))


def gumbel_noise(uniforms: torch.Tensor) -> torch.Tensor:
    """Gumbel noise from uniform draws: a token's noise added to its logit, the largest sum wins."""
    return -torch.log(-torch.log(uniforms))


def unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """32-bit values -> floats strictly inside (0, 1): the top 23 bits plus a half, times 2**-23. Every
    such value is exact in float32 (with 24 bits, 2**24 - 1 + 0.5 rounds up to 2**24, i.e. u = 1.0,
    whose Gumbel noise is +inf: a suppressed token's -inf logit plus it is NaN, which argmax picks)."""
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


MAX_CANDIDATES = 256  # above this top-k, sampling over the whole vocabulary costs about the same
# Candidates beyond the largest top-k: HF's top-k keeps every logit equal to the k-th largest, and bf16
# logits tie often (about two per bf16 step near the 50th of 2,048), so the candidates hold the ties too.
TIE_MARGIN = 16


@dataclass(frozen=True)
class SamplerPlan:
    """The work the service's sampling settings (shared by every request) make void, known to the host,
    so that the frame step leaves it out: static, like a shape."""

    candidates: int = 0  # each row's this many largest logits hold every token it may draw; 0: all
    top_p: bool = True  # some row has top-p below 1
    greedy_rows: bool = True  # some row of a sampling step picks greedily

    @classmethod
    def of(cls, params: SamplingParams) -> SamplerPlan:
        """For rows that all have `params`' settings (the talker's and the code predictor's)."""
        talker = (params.do_sample, params.top_k, params.top_p)
        predictor = (params.sub_do_sample, params.sub_top_k, params.sub_top_p)
        sampling = [(k, p) for on, k, p in (talker, predictor) if on]
        top_ks = [k for k, _ in sampling]
        fits = top_ks and all(0 < k <= MAX_CANDIDATES for k in top_ks)
        return cls(
            candidates=max(top_ks) + TIE_MARGIN if fits else 0,
            top_p=any(p < 1 for _, p in sampling),
            greedy_rows=not (params.do_sample and params.sub_do_sample),
        )


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
    uniforms: torch.Tensor | None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy rows take the argmax; sampled rows apply temperature, top-k and top-p as HF's warpers do,
    then draw by Gumbel-max. `logits` is float32 [rows, vocab]; the other tensors are per row. `noise`:
    the Gumbel noise of the draws, when already made (then `uniforms` is not read)."""
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
    ascending, order = scaled.sort(dim=-1, stable=True)  # equal logits in id order: a fixed tie order
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    not_largest = torch.arange(vocab, device=logits.device) < vocab - 1
    drop_sorted = (cumulative <= (1 - top_p)[:, None]) & not_largest
    drop = drop_sorted.scatter(1, order, drop_sorted)
    scaled = scaled.masked_fill(drop, float("-inf"))
    gumbel = gumbel_noise(uniforms) if noise is None else noise
    sampled = (scaled + gumbel).argmax(dim=-1)
    return torch.where(do_sample, sampled, greedy)


class Draws(NamedTuple):
    """What rows' sampled tokens draw from: each row's `key` [n], hashed with the ids that need a draw, or
    `noise` [n, V], the Gumbel noise of every id's draw made ahead (`frame_step.frame_noise`)."""

    key: torch.Tensor | None = None
    noise: torch.Tensor | None = None

    def gumbel(self, mixed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The noise of ids [n, k]; `mixed`: every id's hashed id (`mixed_ids`)."""
        return self.noise.gather(1, ids) if self.noise is not None else gumbel_noise(draws_from(self.key, mixed[ids]))


def choose_among_top(
    logits: torch.Tensor,
    do_sample: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    draws: Draws,
    mixed: torch.Tensor,
    plan: SamplerPlan,
) -> torch.Tensor:
    """`filter_and_choose` with the draws of `draws` (`mixed`: every id's hashed id), done over each row's
    `plan.candidates` largest logits instead of the whole vocabulary: the same token, since every row's
    top-k is on and below that (see `SamplerPlan.of`), so no other token can be drawn unless more than
    TIE_MARGIN logits tie with its k-th largest. (With top-p, a cumulative sum within float rounding of
    the threshold may fall the other way: the softmax sums fewer terms.)

    One partial top-k instead of two full sorts, hashes for the candidates only, and no top-p or argmax
    work that the settings make void: on a CPU, sampling 8 rows of 2,048 logits goes from 1.5 ms to 0.2 ms."""
    scaled = logits / temperature[:, None]
    values, ids = scaled.topk(plan.candidates, dim=-1)  # descending
    k = top_k.clamp(min=1, max=plan.candidates)
    values = values.masked_fill(values < values.gather(1, (k - 1)[:, None]), float("-inf"))
    if plan.top_p:
        # As filter_and_choose does it, in its order: ascending, equal values by id (topk's order of
        # equal values is its own). The tokens outside the candidates have probability 0 there, so they
        # add nothing to the cumulative sums.
        _, in_id_order = ids.sort(dim=-1)
        ascending, order = values.gather(1, in_id_order).sort(dim=-1, stable=True)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        not_largest = torch.arange(plan.candidates, device=logits.device) < plan.candidates - 1
        drop = (cumulative <= (1 - top_p)[:, None]) & not_largest
        drop = drop.scatter(1, order, drop)  # back to id order
        values = values.masked_fill(drop.scatter(1, in_id_order, drop), float("-inf"))  # to topk's order
    # Without top-p (p = 1), filter_and_choose drops only tokens whose probability is 0 in float32, 103
    # or more below the largest: Gumbel noise from these draws lies between -2.9 and 16.7, so such a
    # token never wins anyway.
    sampled = ids.gather(1, (values + draws.gumbel(mixed, ids)).argmax(dim=-1, keepdim=True)).squeeze(1)
    return torch.where(do_sample, sampled, logits.argmax(dim=-1)) if plan.greedy_rows else sampled
