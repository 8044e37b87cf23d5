"""A seconds-long run of scripts/bench.py, so the benchmark cannot rot (its figures are not asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import REPO_ROOT, LiveServer

BENCH = [sys.executable, str(REPO_ROOT / "scripts" / "bench.py")]


def run_bench(args: list[str], out: Path) -> str:
    """Run bench.py with these arguments and --json OUT; its printed tables."""
    result = subprocess.run(BENCH + args + ["--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_engine_benchmark_smoke(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    args = ["engine", "--batch-sizes", "1", "2", "--frames", "6", "--repeat", "1", "--cache-dir", str(cache_dir)]
    stdout = run_bench(args, out)
    assert "| batch | engine s | plain qwen-tts s |" in stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    assert all(r["frames_per_item"] == 6 and r["engine_s"] > 0 and r["plain_s"] > 0 for r in rows)
    assert rows[1]["audio_s"] == 2 * 6 / 12.5  # both items ran to the forced frame count


def test_service_benchmark_smoke(server: LiveServer, cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "service.json"
    args = ["service", "--url", server.url, "--concurrency", "1", "2", "--requests", "4", "--cache-dir", str(cache_dir)]
    stdout = run_bench(args, out)
    assert "| server | after warm-up ms | overhead vs engine ms | after the load above ms |" in stdout
    data = json.loads(out.read_text())
    assert [r["concurrency"] for r in data["batched"]] == [1, 2]
    assert all(r["failures"] == 0 and len(r["latencies"]) == 4 for r in data["batched"])


def test_mixed_load_script_smoke(server: LiveServer, tmp_path: Path) -> None:
    """scripts/mixed_load.py, for a few seconds against the suite's server: every kind of request answered,
    no failure, each process's memory read, the server ready after it and a seeded stream replaying."""
    out = tmp_path / "mixed.json"
    command = [sys.executable, str(REPO_ROOT / "scripts" / "mixed_load.py"), "--url", server.url]
    command += ["--pid", str(server.process.pid), "--rounds", "1", "--seconds", "6", "--clients", "4"]
    result = subprocess.run(command + ["--json", str(out)], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and "NO FAILURES" in result.stdout, result.stdout + result.stderr
    report = json.loads(out.read_text())
    [only] = report["rounds"]
    assert only["failures"] == [] and only["requests"] >= 6
    assert {"qwen3_tts", "qwen3_tts_synthesizer", "decoder process"} <= set(only["resident_mb"])
    assert report["ready_at_end"] and report["seeded_stream_replays"]


def test_stream_benchmark_smoke(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "stream.json"
    args = ["stream", "--concurrency", "1", "2", "--frames", "10", "--repeat", "1", "--cache-dir", str(cache_dir)]
    stdout = run_bench(args, out)
    assert "| streams | TTFA ms | streamed total s | whole (not streamed) s |" in stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["streams"] for r in rows] == [1, 2]
    # The first chunk (4 frames) comes before a 10-frame utterance is complete.
    assert all(0 < r["ttfa_ms"] / 1000 < r["stream_total_s"] for r in rows)


def test_stream_benchmark_over_http_smoke(server: LiveServer, tmp_path: Path) -> None:
    out = tmp_path / "stream-http.json"
    args = ["stream", "--url", server.url, "--concurrency", "1", "2", "--repeat", "1"]
    stdout = run_bench(args, out)
    assert "| streams | TTFA ms | streamed total s | whole s |" in stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["streams"] for r in rows] == [1, 2]
    assert all(0 < r["ttfa_ms"] / 1000 <= r["stream_total_s"] and r["whole_s"] > 0 for r in rows)
    # The session server decodes greedily, so both routes produce the same audio for the same requests.
    assert all(r["stream_audio_s"] == r["whole_audio_s"] > 0 for r in rows)


def test_step_benchmark_smoke(cache_dir: Path, tmp_path: Path) -> None:
    """The frame step against wave 1's step and plain qwen-tts (scripts/benchmarks/step.py, baseline_step.py)."""
    out = tmp_path / "step.json"
    args = ["step", "--batch-sizes", "1", "4", "--steps", "2", "--repeat", "1", "--cache-dir", str(cache_dir)]
    stdout = run_bench(args, out)
    assert "| batch | new ms | wave 1 ms | plain qwen-tts ms |" in stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 4]
    assert all(r["new_ms"] > 0 and r["old_ms"] > 0 for r in rows)
    # plain qwen-tts's per-frame time is a difference of two whole runs; at 2 steps noise can swamp it
    assert all(math.isfinite(r["plain_ms"]) for r in rows)
    assert "The weights' layout (`batch_invariance` chose" in stdout  # batch invariance is on on the CPU
    assert all(r["relaid_ms"] > 0 for r in rows)
    # 4 slots: the engine's path at the other row padding (2 or 4 rows) it could have chosen, same run
    assert "The row padding (`batch_invariance` chose" in stdout
    assert all({int(p) for p in r["paddings"]} == {2, 4} - {r["padded_rows"]} for r in rows)  # (JSON's keys)
    assert all(min(r["paddings"].values()) > 0 for r in rows)
    assert "| batch | whole vocabulary ms | top candidates ms | speed-up | greedy ms |" in stdout
    sampling = json.loads(out.read_text())["sampling"]
    assert [r["batch"] for r in sampling] == [1, 4] and all(r["candidates"] == 66 for r in sampling)


def test_startup_benchmark_smoke(tmp_path: Path) -> None:
    """Two starts of `bentoml serve` with one fresh cache: the first measures the CPU's start-up checks, the
    restart reads their verdicts back; both answer a stream."""
    out = tmp_path / "startup.json"
    stdout = run_bench(["startup", "--starts", "2", "--max-batch-size", "4"], out)
    assert "| tree | start | to /readyz s | resident GB then | engine load s |" in stdout
    first, restart = json.loads(out.read_text())["runs"]
    assert (first["start"], restart["start"]) == ("first", "restart 1")
    assert first["status"] == restart["status"] == 200
    assert "decoder_check_s" in first and "product_check_s" in first and not first["read_back"]
    assert "decoder_check_s" not in restart and sorted(restart["read_back"]) == ["decoder_check_s", "product_check_s"]
    assert 0 < first["first_audio_s"] and 0 < restart["ready_s"] and 0.2 < first["resident_gb"] < 20


def test_kv_memory_benchmark_smoke(tmp_path: Path) -> None:
    """A burst on the tiny model, free and under a TTS_KV_MEMORY_GB smaller than any one request's claim: the
    limited run steps one request at a time (never none), with the same frames and no errors."""
    out = tmp_path / "kv.json"
    args = ["kvmemory", "--cache-dir", str(tmp_path), "--long-frames", "12", "--short-requests", "2"]
    stdout = run_bench(args + ["--kv-memory-gb", "0.00001"], out)
    assert "| run | resident MB loaded | peak in the burst | held after it |" in stdout
    free, limited = json.loads(out.read_text())["runs"]
    assert (free["most_batch"], limited["most_batch"]) == (3, 1)
    assert free["errors"] == limited["errors"] == [] and free["frames"] == limited["frames"]
    assert limited["kv_claimed_at_most"] > 0


def test_cpu_diagnostic_scripts_smoke(tiny_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    """The diagnostic scripts, briefly (their figures are in PERFORMANCE): gil_contention.py,
    burst_inprocess.py, join_soak.py, kernel_census.py, kernel_instructions.py, and bench_engine.py and
    check_seed_replay.py (GPU checks, here on the CPU). Two run at a time, longest first: each keeps about
    one core busy, and their figures are not asserted (the tiny checkpoint is built before, once)."""
    runs = {
        # torch's kernels' SASS against ours (about 20 s and 0.7 GB of temporary disk)
        "kernel_instructions.py": ([], "THE SAME ARITHMETIC"),
        "bench_engine.py": (
            ["--arch", "tiny", "--device", "cpu", "--frames", "8", "--no-plain", "--streams", "1", "2"]
            + ["--stagger-ms", "5", "--slots", "2", "--sampling", "--first-frames", "1", "quick", "--kernel-forms"]
            + ["--json", str(tmp_path / "engine.json")],
            "| graphs, quick start | 2 |",  # quick start needs batch invariance off: TTS_BATCH_INVARIANT below
        ),
        "gil_contention.py": (
            ["--batch", "2", "--steps", "3", "--repeat", "1"],
            "| beside the decoder in its process |",
        ),
        "kernel_census.py": (["--arch", "tiny"], "| fewer + Triton |"),
        # the GPU kit's seed check; on the CPU a seed must replay the same bytes in any company
        "check_seed_replay.py": (["--model", "tiny", "--device", "cpu", "--frames", "24"], "ALL THE SAME BYTES"),
        "join_soak.py": (["--joins", "12", "--concurrency", "4", "--every", "4"], "Growth from 4 to 12 joins: rss_mb"),
        "burst_inprocess.py": (["--repeat", "1", "--decoder", "none"], "Ratio one by one / together"),
    }

    def run(script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / script), *runs[script][0], "--cache-dir", str(cache_dir)],
            capture_output=True,
            text=True,
            timeout=300,
            env=os.environ | {"TTS_BATCH_INVARIANT": "false"} if script == "bench_engine.py" else None,
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(runs, pool.map(run, runs), strict=True))
    for script, (_, expected) in runs.items():
        result = results[script]
        assert result.returncode == 0, script + "\n" + result.stdout + result.stderr
        assert expected in result.stdout, result.stdout
        if script == "bench_engine.py":  # the two forms' codes agree in float32; the parts' bits are printed
            assert "| fewer kernels |" in result.stdout and result.stdout.count("| None |") == 1, result.stdout
            assert "| ms sampled 1, 100 keys |" in result.stdout, result.stdout  # (2 slots: rows of 1)
            assert "fused QKV product " in result.stdout and "decode attention " in result.stdout, result.stdout
            forms = json.loads((tmp_path / "engine.json").read_text())["kernel_forms"]
            assert [row["forms"] for row in forms["rows"]] == ["qwen-tts's ops", "fewer kernels"]
            # the same-bits figures are the table's, beside its rows, not one form's
            assert "fused QKV product" in forms["parts_same_bits_as_qwen_tts"]
            assert not any("same_bits" in key for row in forms["rows"] for key in row)
        if script == "kernel_census.py":  # each form launches fewer than the one before, greedy and sampled
            lines = [line for line in result.stdout.splitlines() if line.startswith(("| qwen", "| fewer"))]
            counts = [[int(cell.strip().replace(",", "")) for cell in line.split("|")[2:4]] for line in lines]
            assert len(counts) == 3, result.stdout
            for more, fewer in zip(counts, counts[1:], strict=False):
                assert more[0] > fewer[0] and more[1] > fewer[1], counts


def test_startup_checks_script_smoke() -> None:
    """scripts/startup_checks.py: the decoder check measured, then read back as a restart reads it."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "startup_checks.py"), "--arch", "tiny"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr  # both starts found the same verdict
    assert "| first start: measured |" in result.stdout and "| restart: read from the store |" in result.stdout
    assert result.stderr.count("checked in") == 1 and "kept in" in result.stderr  # measured once, then read


def test_gpu_kit_runs_without_the_service_only_packages() -> None:
    """scripts/gpu/ carries no PyAV (35 MB) to the GPU machine: the engine and the GPU benchmarks must import
    without it, and the faster-qwen3-tts script must parse its arguments without faster-qwen3-tts."""
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('av', 'faster_qwen3_tts'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.path.insert(0, 'scripts')\n"
    )
    imports = "import tts_service.engine, bench_engine, census, join_soak, check_gpu_equality, check_seed_replay\n"
    result = subprocess.run(
        [sys.executable, "-c", blocker + imports], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            blocker + "sys.argv = ['x', '--help']\nimport runpy\n"
            "runpy.run_path('scripts/bench_faster_qwen3_tts.py', run_name='__main__')",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--chunk-sizes" in result.stdout, result.stdout + result.stderr
