"""Memory soak: N sequential requests against a service; the synthesizer's resident memory must not creep.

    python scripts/soak.py --requests 500                  # starts a tiny `bentoml serve` itself
    python scripts/soak.py --url http://127.0.0.1:8000 --pid PID --requests 500

Prints the resident set size (RSS) of the service's processes after warm-up and at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_server import running_server  # noqa: E402

TEXTS = ["Hello there.", "The gallery opens at nine.", "Please mind the step.", "Welcome back, traveller."]
SPEAKERS = ["Ryan", "Vivian", "Sohee", "Aiden"]


def rss_mb(pid: int) -> float:
    """RSS of a process and all its children (BentoML runs one process per service worker)."""
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def soak(url: str, pid: int, requests: int, warm_up: int) -> dict[str, float]:
    with httpx.Client(base_url=url, timeout=300) as http:
        started = time.perf_counter()
        baseline = 0.0
        for i in range(requests):
            body = {"text": TEXTS[i % 4], "speaker": SPEAKERS[i % 4]}
            if i % 3 == 0:
                response = http.post(
                    "/v1/audio/speech", json={"model": "tts-1", "voice": "nova", "input": TEXTS[i % 4]}
                )
            else:
                response = http.post("/v1/tts/synthesize", json=body)
            response.raise_for_status()
            if i + 1 == warm_up:
                baseline = rss_mb(pid)
        final = rss_mb(pid)
    return {
        "requests": requests,
        "warm_up": warm_up,
        "rss_after_warm_up_mb": baseline,
        "rss_at_end_mb": final,
        "growth_pct": 100.0 * (final - baseline) / baseline,
        "seconds": time.perf_counter() - started,
    }


@contextlib.contextmanager
def tiny_server() -> Iterator[tuple[str, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        with running_server({"TTS_MODEL": "tiny", "TTS_GREEDY": "true"}, Path(tmp) / "serve.log") as server:
            yield server.url, server.process.pid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url")
    parser.add_argument("--pid", type=int, help="process id of `bentoml serve` (with --url)")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--warm-up", type=int, default=50)
    args = parser.parse_args(argv)
    if args.url:
        result = soak(args.url, args.pid, args.requests, args.warm_up)
    else:
        with tiny_server() as (url, pid):
            result = soak(url, pid, args.requests, args.warm_up)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
