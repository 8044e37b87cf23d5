"""The CPU KV cache's memory through a burst: one long request beside short ones, then nothing. Reports the
engine process's resident memory once loaded, its peak during the burst and what the burst leaves held,
the step batch sizes and the KV claimed (kv_memory.py). Each run is a child process that imports its own
tree's `tts_service` (with --baseline, another checkout of this repository, run first); --kv-memory-gb adds
a run of this tree with that limit (TTS_KV_MEMORY_GB).

    python scripts/bench.py kvmemory --arch 1.7b --baseline /tmp/base --kv-memory-gb 0.05
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from local_server import REPO_ROOT

from benchmarks.common import LONG_TEXTS, environment, resolve_model, table

SHORT_TEXT = "Hello there."
SCRIPTS = Path(__file__).resolve().parents[1]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    model = resolve_model(args)
    runs: list[tuple[str, Path, float | None]] = [("this tree", REPO_ROOT, None)]
    if args.baseline:
        runs.insert(0, ("baseline", args.baseline.resolve(), None))
    if args.kv_memory_gb:
        runs.append((f"this tree, TTS_KV_MEMORY_GB={args.kv_memory_gb:g}", REPO_ROOT, args.kv_memory_gb))
    cache = Path(tempfile.mkdtemp(prefix="bench-kv-"))
    results = []
    for name, tree, limit in runs:
        child = {
            "model": model,
            "cache_dir": str(cache / name.split(",")[0].replace(" ", "-")),  # a tree's verdicts, read back
            "long_frames": args.long_frames,
            "short_requests": args.short_requests,
            "kv_memory_gb": limit,
        }
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "src"), str(SCRIPTS)])}
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.kvmemory", json.dumps(child)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode:
            raise RuntimeError(f"{name}: exited with {done.returncode}:\n{done.stderr[-4000:]}")
        results.append({"run": name, **json.loads(done.stdout.strip().splitlines()[-1])})
    return {"model": model, "environment": environment(), "runs": results}


def report(result: dict[str, Any]) -> str:
    rows = [
        [
            r["run"],
            f"{r['loaded_mb']:.0f}",
            f"{r['peak_mb'] - r['loaded_mb']:+.0f}",
            f"{r['after_mb'] - r['loaded_mb']:+.0f}",
            "-" if r["kv_claimed_at_most"] is None else f"{r['kv_claimed_at_most'] / 2**20:.1f}",
            r["most_batch"],
            f"{r['burst_s']:.1f}",
            ", ".join(r["errors"]) or "none",
        ]
        for r in result["runs"]
    ]
    headers = [
        "run",
        "resident MB loaded",
        "peak in the burst",
        "held after it",
        "KV claimed MB at most",
        "most rows in a step",
        "burst s",
        "errors",
    ]
    title = f"## CPU KV memory through a burst, {result['model']} ({result['environment']})"
    return "\n".join([title, "", table(headers, rows, True)])


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One run, in this process: the tree on PYTHONPATH loads the engine, takes the burst, says what it held."""
    import logging

    import psutil

    from tts_service.engine import SynthesisRequest, TTSEngine
    from tts_service.settings import Settings

    logging.basicConfig(level=logging.WARNING)
    overrides = {} if spec["kv_memory_gb"] is None else {"kv_memory_gb": spec["kv_memory_gb"]}
    settings = Settings(
        model=spec["model"],
        cache_dir=Path(spec["cache_dir"]),
        device="cpu",
        greedy=True,
        max_batch_size=1 + spec["short_requests"],
        max_new_tokens=spec["long_frames"],
        **overrides,
    )
    engine = TTSEngine.load(settings)
    claims = getattr(engine.scheduler, "kv_memory", None)  # the baseline has none
    process = psutil.Process()
    loaded = process.memory_info().rss
    peak = {"rss": loaded, "kv": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            peak["rss"] = max(peak["rss"], process.memory_info().rss)

    if claims is not None:  # read at every step, where a sampler could miss a short request's claim
        engine.scheduler.on_step = lambda batch: peak.update(kv=max(peak["kv"], claims.claimed))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    long = SynthesisRequest(text=LONG_TEXTS[0], speaker="ryan", language="english")
    requests = [long] + [SynthesisRequest(text=SHORT_TEXT, speaker="ryan", language="english")] * spec["short_requests"]
    started = time.perf_counter()
    handles = [engine.submit(r, f"kv-{i}", stream=False) for i, r in enumerate(requests)]
    for handle in handles:
        list(handle)
    burst = time.perf_counter() - started
    time.sleep(1.0)  # the decoder's last pieces
    stop.set()
    sampler.join()
    after = process.memory_info().rss
    return {
        "loaded_mb": loaded / 2**20,
        "peak_mb": peak["rss"] / 2**20,
        "after_mb": after / 2**20,
        "kv_claimed_at_most": peak["kv"] if claims is not None else None,  # bytes
        "most_batch": max(handle.end.max_batch for handle in handles),
        "frames": [handle.end.frames for handle in handles],
        "burst_s": burst,
        "errors": sorted({handle.end.error for handle in handles if handle.end.error}),
    }


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
