"""Turn the jobs BentoML's adaptive batcher gathered into one engine call and per-job outcomes.

Validation happens here, next to the loaded model, per job: a job with an unknown speaker or
language gets an error outcome and the rest of the batch is still synthesized together.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from tts_service.engine import SynthesisRequest, SynthesisResult, TTSEngine, UnknownVoiceError
from tts_service.schemas import SynthesisJob, SynthesisOutcome

logger = logging.getLogger(__name__)


def validate_job(engine: TTSEngine, job: SynthesisJob) -> SynthesisRequest | SynthesisOutcome:
    """The engine's request for a job, or the refusal naming the field and the allowed values."""
    text = job.text.strip()
    if not text:
        return SynthesisOutcome(error_field="text", error="text is empty")
    try:
        return SynthesisRequest(
            text=text,
            speaker=engine.resolve_speaker(job.speaker),
            language=engine.resolve_language(job.language),
            instruct=job.instruct.strip(),
        )
    except UnknownVoiceError as exc:
        return SynthesisOutcome(error_field=exc.field, error=str(exc), allowed=exc.allowed)


def synthesize_jobs(engine: TTSEngine, jobs: Sequence[SynthesisJob]) -> list[SynthesisOutcome]:
    outcomes: list[SynthesisOutcome | None] = [None] * len(jobs)
    accepted: list[tuple[int, SynthesisRequest]] = []
    for index, job in enumerate(jobs):
        checked = validate_job(engine, job)
        if isinstance(checked, SynthesisOutcome):
            outcomes[index] = checked
        else:
            accepted.append((index, checked))

    for index, outcome in _generate(engine, jobs, accepted):
        outcomes[index] = outcome
    missing = [index for index, outcome in enumerate(outcomes) if outcome is None]
    if missing:
        raise RuntimeError(f"no outcome for jobs {missing}")  # would misalign the batcher's results
    return outcomes  # type: ignore[return-value]  # all filled, checked above


def _outcome(result: SynthesisResult) -> SynthesisOutcome:
    return SynthesisOutcome(
        wav=result.wav,
        sample_rate=result.sample_rate,
        num_samples=result.num_samples,
        frames=result.frames,
        truncated=result.truncated,
        batch_size=result.batch_size,
    )


def _generate(
    engine: TTSEngine, jobs: Sequence[SynthesisJob], accepted: list[tuple[int, SynthesisRequest]]
) -> Iterator[tuple[int, SynthesisOutcome]]:
    """One call for the whole batch; if it fails, each item alone, so one bad item fails only itself."""
    if not accepted:
        return
    try:
        results = engine.synthesize([request for _, request in accepted])
    except Exception:
        ids = ", ".join(jobs[index].request_id or "?" for index, _ in accepted)
        logger.exception("generation failed for a batch of %d (requests %s)", len(accepted), ids)
        if len(accepted) == 1:
            yield accepted[0][0], _failure(jobs[accepted[0][0]])
            return
        logger.info("retrying the %d requests of the failed batch one at a time", len(accepted))
        for index, request in accepted:
            try:
                (result,) = engine.synthesize([request])
            except Exception:
                logger.exception("generation failed for request %s", jobs[index].request_id or "?")
                yield index, _failure(jobs[index])
            else:
                yield index, _outcome(result)
        return
    for (index, _), result in zip(accepted, results, strict=True):
        yield index, _outcome(result)


def _failure(job: SynthesisJob) -> SynthesisOutcome:
    return SynthesisOutcome(
        error_field="internal", error=f"synthesis failed (request id {job.request_id or 'unknown'})"
    )
