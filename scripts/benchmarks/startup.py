"""Start-up of `bentoml serve`: the seconds to /readyz at a first start (the CPU's invariance checks measured)
and at restarts (their verdicts read back from TTS_CACHE_DIR), what the log says they were spent on, the
memory resident once ready, and the first audio of a stream sent then. With --baseline (another checkout
of this repository), its starts alternate with this tree's, each tree with its own fresh cache, and the
ratios are printed."""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from local_server import REPO_ROOT, start_server, stop_server, wait_ready

from benchmarks.common import environment, resolve_model, table

# What the service's log says start-up was spent on (engine.py, batch_invariance.py)
LOG_FIGURES = {
    "load_s": re.compile(r"loaded .* in ([0-9.]+) s;"),
    "product_check_s": re.compile(r"keeps every row's bits from .*\(checked in ([0-9.]+) s\)"),
    "decoder_check_s": re.compile(r"stateful decoder windows .*\(checked in ([0-9.]+) s\)"),
}

READ_BACK = {
    "product_check_s": re.compile(r"keeps every row's bits from .*\(as this machine measured it"),
    "decoder_check_s": re.compile(r"stateful decoder windows .*\(as this machine measured it"),
}


def first_audio_s(url: str) -> tuple[int, float]:
    """Status and seconds to the first audio of a stream (closed then: random weights never stop)."""
    body = {"text": "A first request after start-up.", "speaker": "Ryan", "format": "pcm"}
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/tts/stream", json=body, timeout=600) as response:
        for chunk in response.iter_bytes():
            if chunk:
                break
        return response.status_code, time.perf_counter() - started


def resident_bytes(pid: int) -> int:
    """Resident memory of `bentoml serve` and all its processes (workers, the decoder child)."""
    root = psutil.Process(pid)
    return sum(process.memory_info().rss for process in [root, *root.children(recursive=True)])


def one_start(tree: Path, env: dict[str, str], log: Path, ready_timeout_s: float) -> dict[str, Any]:
    started = time.perf_counter()
    server = start_server(env, log, repo_root=tree)
    try:
        wait_ready(server, ready_timeout_s)
        ready = time.perf_counter() - started
        resident = resident_bytes(server.process.pid)
        status, first_audio = first_audio_s(server.url)
    finally:
        stop_server(server)
    text = log.read_text(errors="replace")
    figures = {key: float(m.group(1)) for key, pattern in LOG_FIGURES.items() if (m := pattern.search(text))}
    read = [check for check, pattern in READ_BACK.items() if pattern.search(text)]
    return {
        "ready_s": ready,
        "resident_gb": resident / 1e9,
        "status": status,
        "first_audio_s": first_audio,
        "read_back": read,
        **figures,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    model = resolve_model(args)
    trees = {"this tree": REPO_ROOT}
    if args.baseline:
        trees = {"baseline": args.baseline.resolve(), **trees}
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    runs: list[dict[str, Any]] = []
    for start in range(args.starts):  # trees alternate: first starts side by side, then each restart
        for name, tree in trees.items():
            env = {
                "TTS_MODEL": model,
                "TTS_CACHE_DIR": str(work / f"cache-{name.replace(' ', '-')}"),  # fresh at the first start
                "TTS_DEVICE": args.device,
                "TTS_MAX_BATCH_SIZE": str(args.max_batch_size),
                "TTS_COMPILE_STEP": str(args.compile_step).lower(),
                "TTS_DECODER_WORKER": args.decoder_worker,
            }
            if args.max_new_tokens:
                env["TTS_MAX_NEW_TOKENS"] = str(args.max_new_tokens)
            log = work / f"{name.replace(' ', '-')}-start{start}.log"
            run = {"tree": name, "start": "first" if start == 0 else f"restart {start}"}
            run |= one_start(tree, env, log, args.ready_timeout)
            runs.append(run)
    return {"model": model, "environment": environment(), "logs": str(work), "runs": runs}


def report(result: dict[str, Any]) -> str:
    def cell(run: dict[str, Any], key: str) -> str:
        """Seconds measured, "read" back from the verdicts, or "-" (not run: on a GPU, or no invariance)."""
        return f"{run[key]:.1f}" if key in run else "read" if key in run["read_back"] else "-"

    rows = [
        [
            r["tree"],
            r["start"],
            f"{r['ready_s']:.1f}",
            f"{r['resident_gb']:.1f}",
            f"{r['load_s']:.1f}" if "load_s" in r else "?",
            cell(r, "product_check_s"),
            cell(r, "decoder_check_s"),
            f"{r['status']}, {r['first_audio_s']:.2f}",
        ]
        for r in result["runs"]
    ]
    headers = [
        "tree",
        "start",
        "to /readyz s",
        "resident GB then",
        "engine load s",
        "product check s",
        "decoder check s",
        "stream: status, first audio s",
    ]
    out = [
        f"## Start-up of `bentoml serve`, {result['model']} ({result['environment']})",
        "",
        table(headers, rows, True),
    ]
    baseline = {r["start"]: r for r in result["runs"] if r["tree"] == "baseline"}
    ratios = [
        f"- {r['start']}: baseline {baseline[r['start']]['ready_s']:.1f} s / this tree {r['ready_s']:.1f} s = "
        f"{baseline[r['start']]['ready_s'] / r['ready_s']:.2f}x"
        for r in result["runs"]
        if r["tree"] == "this tree" and r["start"] in baseline
    ]
    if ratios:
        out += ["", "Time to /readyz, baseline / this tree:", *ratios]
    out += ["", f"Logs: {result['logs']}"]
    return "\n".join(out)
