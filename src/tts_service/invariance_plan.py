"""What keeps a request's bits independent of the company it keeps (`TTS_BATCH_INVARIANT`), chosen at
start-up from what `batch_invariance` measures on this machine."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tts_service import frame_step as fs
from tts_service.batch_invariance import ProductLayout, ProductShape, choose_layout, decoder_batch_min_frames
from tts_service.chunk_decoder import STATEFUL_BATCH_MIN_FRAMES, stateful_batch_limit
from tts_service.verdict_store import VerdictStore

logger = logging.getLogger(__name__)

# Stateful window lengths the start-up check decodes batched and alone: the stream plan's chunks, and up to
# the longest that is batched (`stateful_batch_limit`); other lengths (a stream's last window) are taken to
# follow their neighbours, as every length from 4 to 32 did where measured (docs/PERFORMANCE.md).
DECODER_CHECK_FRAMES = (4, 8, 16, 32)


@dataclass(frozen=True)
class InvariancePlan:
    """What keeps a request's bits independent of the company it keeps, so a seed replays byte for byte
    (`TTS_BATCH_INVARIANT`). Nothing by default: every product runs over the rows there are."""

    min_rows: int = 1  # the step's and the prefill's products run over at least this many rows
    prefill_alone: bool = False  # each joining prompt is prefilled by itself
    decode_alone: bool = False  # each window is decoded by itself, at its own length
    # A step computes at least this many rows, free slots beside the batch's, so that its products have
    # min_rows rows without padding each one (a lone request's step: 18% faster on an AMD EPYC, the same on a Xeon)
    min_window: int = 1

    # The step's weights are held as contiguous [in, out] matrices (on the CPUs where that keeps the bits)
    contiguous_weights: bool = False
    # Stateful decoder windows of fewer frames are decoded alone (from it on, batched ones keep their bits)
    stateful_batch_min_frames: int = STATEFUL_BATCH_MIN_FRAMES

    @classmethod
    def choose(
        cls,
        invariant: bool,
        on_cuda: bool,
        slots: int,
        stateful_decoding: bool,
        shapes: Sequence[ProductShape] | None = None,
        dtype: torch.dtype = torch.float32,
        speech_decoder: torch.nn.Module | None = None,
        threads: int = 1,
        store: VerdictStore | None = None,
    ) -> InvariancePlan:
        """On the CPU, MKL multiplies few rows with other kernels than many; from how many rows on a row
        keeps its bits at every count depends on the processor and the weights' layout, so it is measured
        for the model's `shapes` (`batch_invariance.choose_layout`: 2 rows, then 4; without shapes,
        transposed views padded to 4 rows, which hold on the AMD EPYC measured). A step of fewer rows than the
        padding computes free slots beside them instead of padding every product (the same bits, fewer
        operations); each prompt is prefilled alone (a prefill's products have as many rows as the prompts
        have tokens, past what the start-up check covers); the stateful decoder batches windows only from
        the length at which that keeps their bits, measured with `speech_decoder` (without it, from
        `STATEFUL_BATCH_MIN_FRAMES`; at no length, each window alone), and windows without state
        (`TTS_STREAM_DECODER=window`) are decoded alone, since batched convolutions change their bits.
        On a GPU, cuBLAS and cuDNN choose kernels by the batch's size, so every product runs at one size
        (all the slots; with memory-bound weights that should cost little), each prompt is prefilled alone
        and each window is decoded alone. The Triton kernels compute each row by itself (the talker's
        decode attention over its own keys, sampling, the norms); whether that suffices there (the code
        predictor's SDPA is not padded) is measured by scripts/check_seed_replay.py. `store` keeps the CPU
        checks' verdicts across restarts (verdict_store.py)."""
        if not invariant:
            return cls()
        if on_cuda:
            return cls(min_rows=slots, prefill_alone=True, decode_alone=True)
        layout = ProductLayout(False, fs.INVARIANT_MIN_ROWS)
        if shapes is not None:
            chosen = choose_layout(shapes, slots, threads, fs.INVARIANT_ROW_PADDINGS, max(slots, 1), dtype, store)
            if chosen is None:
                logger.warning(
                    "batch invariance: on this CPU a row's bits depend on the row count in every weight layout "
                    "tried; a seed replays byte for byte alone, not always in company"
                )
            layout = chosen or layout
        decode_alone, min_frames = not stateful_decoding, STATEFUL_BATCH_MIN_FRAMES
        if stateful_decoding and speech_decoder is not None:
            from tts_service.streaming_decoder import StreamingDecoder

            lowest = decoder_batch_min_frames(
                StreamingDecoder(speech_decoder), DECODER_CHECK_FRAMES, stateful_batch_limit, store=store
            )
            decode_alone, min_frames = lowest is None, lowest or min_frames
        return cls(
            min_rows=layout.min_rows,
            prefill_alone=True,
            decode_alone=decode_alone,
            min_window=layout.min_rows if slots >= layout.min_rows else 1,
            contiguous_weights=layout.contiguous,
            stateful_batch_min_frames=min_frames,
        )
