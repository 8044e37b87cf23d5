"""Turn the jobs BentoML's adaptive batcher gathered into one engine call and per-job outcomes.

Validation happens here, next to the loaded model, per job: a job with an unknown speaker or
language gets an error outcome and the rest of the batch is still synthesized together.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from tts_service.engine import SynthesisRequest, TTSEngine, UnknownVoiceError
from tts_service.schemas import SynthesisJob, SynthesisOutcome

logger = logging.getLogger(__name__)


def synthesize_jobs(engine: TTSEngine, jobs: Sequence[SynthesisJob]) -> list[SynthesisOutcome]:
    outcomes: list[SynthesisOutcome | None] = [None] * len(jobs)
    accepted: list[tuple[int, SynthesisRequest]] = []
    for index, job in enumerate(jobs):
        text = job.text.strip()
        if not text:
            outcomes[index] = SynthesisOutcome(error_field="text", error="text is empty")
            continue
        try:
            request = SynthesisRequest(
                text=text,
                speaker=engine.resolve_speaker(job.speaker),
                language=engine.resolve_language(job.language),
                instruct=job.instruct.strip(),
            )
        except UnknownVoiceError as exc:
            outcomes[index] = SynthesisOutcome(error_field=exc.field, error=str(exc), allowed=exc.allowed)
            continue
        accepted.append((index, request))

    results = engine.synthesize([request for _, request in accepted])
    for (index, _), result in zip(accepted, results, strict=True):
        outcomes[index] = SynthesisOutcome(
            wav=result.wav,
            sample_rate=result.sample_rate,
            num_samples=result.num_samples,
            frames=result.frames,
            truncated=result.truncated,
            batch_size=result.batch_size,
        )
    missing = [index for index, outcome in enumerate(outcomes) if outcome is None]
    if missing:
        raise RuntimeError(f"no outcome for jobs {missing}")  # would misalign the batcher's results
    return outcomes  # type: ignore[return-value]  # all filled, checked above
