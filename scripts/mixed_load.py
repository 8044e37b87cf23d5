"""Mixed load: many clients send a random mix of requests, some abandoned or malformed, for rounds of N seconds.

    python scripts/mixed_load.py --rounds 3 --seconds 300        # starts a tiny `bentoml serve` itself
    python scripts/mixed_load.py --url http://127.0.0.1:8000 --pid PID

Each client loops over: whole files (/v1/tts/synthesize, with and without `instruct`), streams over POST and
GET in PCM or WAV (a third of them closed after their first bytes), OpenAI speech in every format and
speed, OpenAI SSE, and malformed bodies (broken or wrong JSON, wrong content types, a path for a speaker,
an oversized text) on every POST route. Any 5xx or transport error fails the run; so does a seeded
stream that does not replay its bytes afterwards, or a server that is not ready at the end. The resident
memory of each of the service's processes is printed after every round: it should level off, not climb.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import random
import sys
import tempfile
import threading
import time
import wave
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_server import running_server  # noqa: E402

WORDS = "the gallery opens at nine and closes at six 日本語 テキスト 안녕하세요 北京 hello world , . ! ? ä ö ü".split()
KINDS = ("synthesize", "stream", "stream_get", "speech", "speech_sse", "malformed")
MALFORMED = [
    b"{",
    b"[]",
    b'{"text": 5}',
    b"\xff\xfe\x00",
    json.dumps({"text": "", "speaker": "Ryan"}).encode(),
    json.dumps({"text": "x" * 100_000, "speaker": "Ryan"}).encode(),
    json.dumps({"text": "hi", "speaker": "Ryan", "seed": 2**70}).encode(),
    json.dumps({"text": "hi", "speaker": "../../etc/passwd"}).encode(),
    json.dumps({"text": "hi", "speaker": "Ryan", "format": "exe"}).encode(),
    json.dumps({"text": "hi", "speaker": "Ryan", "language": None}).encode(),
]
ROUTES = ("/v1/tts/synthesize", "/v1/tts/stream", "/v1/audio/speech", "/v1/audio/voices")
CONTENT_TYPES = ("application/json", "text/plain", "multipart/form-data; boundary=x")


class Tally:
    """Statuses per request kind, and the failures (5xx, or no answer) with the start of their bodies."""

    def __init__(self) -> None:
        self.statuses: collections.Counter[tuple[str, int]] = collections.Counter()
        self.failures: list[str] = []
        self._lock = threading.Lock()

    def add(self, kind: str, status: int, detail: bytes | str = b"") -> None:
        with self._lock:
            self.statuses[(kind, status)] += 1
            if status >= 500 or status == 0:
                text = detail.decode(errors="replace") if isinstance(detail, bytes) else detail
                self.failures.append(f"{kind} {status}: {text[:200]}")


def words(rng: random.Random, most: int = 40) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, most)))


def one_request(http: httpx.Client, rng: random.Random, voices: dict[str, list[str]], tally: Tally) -> None:
    kind = rng.choice(KINDS)
    try:
        if kind == "synthesize":
            body = {"text": words(rng), "speaker": rng.choice(voices["speakers"])}
            body["language"] = rng.choice(voices["languages"])
            if rng.random() < 0.3:
                body["instruct"] = words(rng, 5)
            response = http.post("/v1/tts/synthesize", json=body)
            if response.status_code == 200:
                wave.open(io.BytesIO(response.content)).getnframes()  # a whole WAV file, or this raises
            tally.add(kind, response.status_code, response.content)
        elif kind in ("stream", "stream_get"):
            body = {"text": words(rng), "speaker": rng.choice(voices["speakers"]), "format": rng.choice(["pcm", "wav"])}
            if kind == "stream":
                request = http.build_request("POST", "/v1/tts/stream", json=body)
            else:
                request = http.build_request("GET", "/v1/tts/stream", params=body)
            response = http.send(request, stream=True)
            stop_after, received = rng.choice([None, None, 1, 5_000, 40_000]), 0  # None: read to the end
            try:
                for chunk in response.iter_bytes():
                    received += len(chunk)
                    if stop_after and received >= stop_after:
                        break  # the client goes away mid-stream
            finally:
                response.close()
            tally.add(kind, response.status_code)
        elif kind in ("speech", "speech_sse"):
            body = {"model": "tts-1", "input": words(rng), "voice": rng.choice(["alloy", "nova", *voices["speakers"]])}
            if kind == "speech":
                body |= {"response_format": rng.choice(["mp3", "opus", "aac", "flac", "wav", "pcm"])}
                body |= {"speed": rng.choice([0.25, 0.8, 1.0, 1.7, 4.0])}
            else:
                body |= {"stream_format": "sse", "response_format": rng.choice(["pcm", "wav"])}
            response = http.post("/v1/audio/speech", json=body)
            tally.add(kind, response.status_code, response.content)
        else:
            headers = {"content-type": rng.choice(CONTENT_TYPES)}
            response = http.post(rng.choice(ROUTES), content=rng.choice(MALFORMED), headers=headers)
            tally.add(kind, response.status_code, response.content)
    except httpx.HTTPError as exc:
        tally.add(kind, 0, f"{type(exc).__name__}: {exc}")


def resident_mb(pid: int) -> dict[str, float]:
    """Resident memory of the server and of each process under it, by a short name of its command."""
    root = psutil.Process(pid)
    sizes: dict[str, float] = {}
    for process in [root, *root.children(recursive=True)]:
        command = " ".join(process.cmdline())
        if "decoder_process" in command:
            name = "decoder process"
        elif "--service-name" in command:
            name = command.split("--service-name")[1].split()[0]
        else:
            name = "bentoml serve"
        sizes[name] = sizes.get(name, 0.0) + process.memory_info().rss / 2**20
    return sizes


def seeded_stream(http: httpx.Client, speaker: str) -> tuple[int, bytes]:
    body = {"text": "A seeded line that must replay.", "speaker": speaker, "seed": 1234, "format": "pcm"}
    with http.stream("POST", "/v1/tts/stream", json=body) as response:
        return response.status_code, response.read()


def mixed_load(url: str, pid: int | None, rounds: int, seconds: float, clients: int, seed: int) -> dict:
    with httpx.Client(base_url=url, timeout=120) as http:
        speakers = http.get("/v1/tts/speakers").json()["speakers"]
        voices = {"speakers": speakers, "languages": http.get("/v1/tts/languages").json()["languages"]}
        first = seeded_stream(http, speakers[0])
        report: dict = {"clients": clients, "seconds_per_round": seconds, "rounds": []}
        if pid is not None:
            report["resident_mb_before"] = resident_mb(pid)
        for number in range(rounds):
            tally, end = Tally(), time.monotonic() + seconds

            def client(index: int, tally: Tally = tally, end: float = end, number: int = number) -> None:
                rng = random.Random(seed * 1_000_003 + number * 1_009 + index)
                with httpx.Client(base_url=url, timeout=120) as own:
                    while time.monotonic() < end:
                        one_request(own, rng, voices, tally)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            time.sleep(2)  # abandoned streams end at the server's next step
            entry = {
                "requests": sum(tally.statuses.values()),
                "statuses": {f"{kind} {status}": n for (kind, status), n in sorted(tally.statuses.items())},
                "failures": tally.failures,
            }
            if pid is not None:
                entry["resident_mb"] = resident_mb(pid)
            report["rounds"].append(entry)
            print_round(number + 1, entry, report.get("resident_mb_before"))
        report["ready_at_end"] = http.get("/readyz").status_code == 200
        report["seeded_stream_replays"] = first[0] == 200 and seeded_stream(http, speakers[0]) == first
    return report


def print_round(number: int, entry: dict, before: dict[str, float] | None) -> None:
    print(
        f"round {number}: {entry['requests']} requests; " + ", ".join(f"{k}: {n}" for k, n in entry["statuses"].items())
    )
    for failure in entry["failures"][:10]:
        print(f"  FAILED {failure}")
    if "resident_mb" in entry:
        sizes = ", ".join(
            f"{name} {size:.0f}" + (f" ({size - before[name]:+.0f})" if before and name in before else "")
            for name, size in entry["resident_mb"].items()
        )
        print(f"  resident MB (since the start): {sizes}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running service; default: start a tiny one (sampled, as served)")
    parser.add_argument("--pid", type=int, help="process id of `bentoml serve` (with --url), for its memory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=300, help="per round")
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0, help="of the clients' random choices")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    run = (args.rounds, args.seconds, args.clients, args.seed)
    if args.url:
        report = mixed_load(args.url, args.pid, *run)
    else:
        with (
            tempfile.TemporaryDirectory() as tmp,
            running_server({"TTS_MODEL": "tiny"}, Path(tmp) / "serve.log") as server,
        ):
            report = mixed_load(server.url, server.process.pid, *run)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    failed = [failure for entry in report["rounds"] for failure in entry["failures"]]
    ok = not failed and report["ready_at_end"] and report["seeded_stream_replays"]
    print(f"ready at the end: {report['ready_at_end']}; a seeded stream replays: {report['seeded_stream_replays']}")
    print("NO FAILURES" if ok else f"FAILED: {len(failed)} requests")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
