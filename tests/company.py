"""A row stepped alone and in company: what batch invariance (a seed replays byte for byte in any
company) is checked on."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tests.oracle import ORACLE_REQUESTS as REQUESTS
from tts_service import frame_step as fs
from tts_service.engine import TTSEngine


def row_zero_after_steps(
    engine: TTSEngine,
    n: int,
    frames: int = 12,
    step: Callable | None = None,
    sample: bool = True,
    window: int = 1,
) -> list[torch.Tensor]:
    """Row 0 (always the same prompt and seed) prefilled beside n - 1 others, then stepped `frames` times
    by `step` (the eager frame step by default) over at least `window` rows (free slots past n, as the
    scheduler steps them), on one intra-op thread as the engine loop runs: its codes and every float it
    keeps (talker hidden state, talker and predictor keys and values)."""
    step = step or fs.frame_step
    scheduler = engine.scheduler
    w, s = scheduler.weights, scheduler.state
    # Shorter and longer prompts than row 0's: a prefill pads to the longest, a step attends up to it.
    texts = [REQUESTS[0].text] + [REQUESTS[1].text + " and more" * (3 * i) for i in range(1, n)]
    prompts = [scheduler.prompts.build(text, "ryan", "english") for text in texts]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            fs.prefill(w, s, list(range(n)), prompts, [scheduler.sampling_params(5 + i) for i in range(n)])
            codes = []
            for _ in range(frames):
                kv_len = min(s.max_len, (int(s.position[:n].max()) // 32 + 1) * 32)  # grows with the company
                codes.append(step(w, s, max(n, window), kv_len, sample)[0][0].clone())
            end = int(s.position[0])
            kept = [torch.stack(codes), s.past_hidden[0].clone()]
            kept += [cache[0, :, :end].clone() for cache in (*s.keys, *s.values)]
            kept += [cache[0].clone() for cache in (*s.predictor_keys, *s.predictor_values)]
            for slot in range(n):
                fs.release(s, slot)
    finally:
        torch.set_num_threads(threads)
    return kept
