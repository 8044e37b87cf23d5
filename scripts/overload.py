"""Overload: many more concurrent clients than the queue allows, for a bounded time.

    python scripts/overload.py --clients 16 --seconds 30                # starts a tiny server, queue 4
    python scripts/overload.py --url http://127.0.0.1:8000 --clients 64 --seconds 60

Every request must end in 200, 429 or 503 within its timeout; afterwards the service must answer a
plain request normally. Prints outcomes by kind and the latency of answers and refusals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_server import running_server  # noqa: E402

TEXTS = ["Over here!", "The doors close in one minute.", "Stay close to the guide, please.", "Look up."]
ACCEPTABLE = {200, 429, 503}


def _body(i: int) -> tuple[str, dict]:
    if i % 2:
        return "/v1/audio/speech", {"model": "tts-1", "voice": "echo", "input": TEXTS[i % 4]}
    return "/v1/tts/synthesize", {"text": TEXTS[i % 4], "speaker": "Ryan"}


async def _client(
    http: httpx.AsyncClient, index: int, deadline: float, outcomes: Counter, latency: dict[str, list[float]]
) -> None:
    sent = 0
    while time.perf_counter() < deadline:
        path, body = _body(index + sent)
        sent += 1
        started = time.perf_counter()
        try:
            response = await http.post(path, json=body)
            kind = str(response.status_code)
            if response.status_code == 200 and not response.content:
                kind = "200-empty"
            if response.status_code == 429 and not response.headers.get("retry-after", "").isdigit():
                kind = "429-without-retry-after"
        except httpx.TimeoutException:
            kind = "timeout"
        except httpx.HTTPError as exc:
            kind = type(exc).__name__
        outcomes[kind] += 1
        latency.setdefault(kind, []).append(time.perf_counter() - started)
        if kind == "429":
            await asyncio.sleep(0.05)  # a polite client backs off a little; still far over the limit


async def overload(url: str, clients: int, seconds: float, timeout_s: float, headers: dict | None = None) -> dict:
    outcomes: Counter = Counter()
    latency: dict[str, list[float]] = {}
    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits, headers=headers) as http:
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()
        await asyncio.gather(*[_client(http, i, deadline, outcomes, latency) for i in range(clients)])
        drained_s = time.perf_counter() - started
        after = await http.post("/v1/tts/synthesize", json={"text": "All calm again.", "speaker": "Vivian"})
    return {
        "clients": clients,
        "seconds": seconds,
        "requests": sum(outcomes.values()),
        "outcomes": dict(outcomes),
        "unacceptable": {k: v for k, v in outcomes.items() if k not in {str(s) for s in ACCEPTABLE}},
        "p50_s": {k: statistics.median(v) for k, v in latency.items()},
        "max_s": {k: max(v) for k, v in latency.items()},
        "all_done_after_s": drained_s,
        "after_status": after.status_code,
        "after_is_wav": after.content[:4] == b"RIFF",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running service; default: start a tiny one")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--timeout", type=float, default=60, help="per request, seconds")
    parser.add_argument("--queue", type=int, default=4, help="TTS_MAX_QUEUE of the server this starts")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.url:
        result = asyncio.run(overload(args.url, args.clients, args.seconds, args.timeout))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            env = {"TTS_MODEL": "tiny", "TTS_MAX_QUEUE": str(args.queue), "TTS_MAX_BATCH_SIZE": "4"}
            with running_server(env, Path(tmp) / "serve.log") as live:
                result = asyncio.run(overload(live.url, args.clients, args.seconds, args.timeout))
                result["queue"] = args.queue
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:>18}: {value}")
    sys.exit(1 if result["unacceptable"] or result["after_status"] != 200 else 0)


if __name__ == "__main__":
    main()
