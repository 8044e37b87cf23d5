"""Prometheus metrics of our own, shown on BentoML's `/metrics` next to its built-in ones.

Created on first use, inside a worker: BentoML sets PROMETHEUS_MULTIPROC_DIR only when a worker starts,
and a metric created earlier would be invisible to its multiprocess collector.
"""

from __future__ import annotations

from functools import cache
from typing import Any

SECONDS_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RTF_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


@cache
def time_to_first_audio() -> Any:
    from prometheus_client import Histogram

    return Histogram(
        "tts_time_to_first_audio_seconds",
        "From request arrival to the first audio byte handed to the client (whole file if not streamed).",
        ["route"],
        buckets=SECONDS_BUCKETS,
    )


@cache
def real_time_factor() -> Any:
    from prometheus_client import Histogram

    return Histogram(
        "tts_real_time_factor",
        "Seconds of audio per wall-clock second of the whole request (above 1: faster than real time).",
        ["route"],
        buckets=RTF_BUCKETS,
    )


@cache
def step_batch_size() -> Any:
    from prometheus_client import Histogram

    return Histogram(
        "tts_step_batch_size",
        "Requests (streamed or not) advanced together in one decode step of the engine.",
        buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
    )


@cache
def queue_wait() -> Any:
    from prometheus_client import Histogram

    return Histogram(
        "tts_queue_wait_seconds",
        "From a request's submission to the engine to its prefill: the next step boundary, or a free KV slot "
        "when all TTS_MAX_BATCH_SIZE are taken (then raise it, or add capacity).",
        buckets=WAIT_BUCKETS,
    )
