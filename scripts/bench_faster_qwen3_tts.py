"""faster-qwen3-tts on the same checkpoint, text, voices and frame counts as bench_engine.py: single-stream
real-time factor, time to first audio when streaming, and what it gives several streams (it serves one
request at a time, so N streams take N times one).

It runs in an environment of its own: faster-qwen3-tts 0.5.4 needs transformers 5 and qwen-tts-hf, which
installs as `qwen_tts` too, so it cannot share this project's venv (transformers 4.57.3). On a lent GPU
`scripts/gpu/issue15.sh faster` sets that environment up from carried wheels and runs:

    PYTHONPATH=/tmp/faster python3 scripts/bench_faster_qwen3_tts.py --model /tmp/ckpt/random-1.7b-v1

End of speech is held off with min_new_tokens = max_new_tokens = --frames, so every request makes exactly
that many frames, as in bench_engine.py (where the end-of-speech logit is suppressed). faster-qwen3-tts
captures its code predictor's graph with sampling on (top-k 50, temperature 0.9), so it samples here;
bench_engine.py runs greedy. Prints markdown tables; `--json FILE` also writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks.workload import FRAME_RATE, TEXT, VOICES  # noqa: E402

logger = logging.getLogger("bench_faster_qwen3_tts")


def _timed(call: Any) -> tuple[float, Any]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = call()
    torch.cuda.synchronize()
    return time.perf_counter() - started, result


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import faster_qwen3_tts
    from faster_qwen3_tts import FasterQwen3TTS

    load_s, model = _timed(
        lambda: FasterQwen3TTS.from_pretrained(str(args.model), device="cuda", dtype=getattr(torch, args.dtype))
    )
    capture_s, _ = _timed(model.warmup)
    speaker, language = VOICES[0]
    request = {
        "text": TEXT,
        "speaker": speaker,
        "language": language,
        "max_new_tokens": args.frames,
        "min_new_tokens": args.frames,
    }
    model.generate_custom_voice(**{**request, "max_new_tokens": 8, "min_new_tokens": 8})  # warm

    whole = []
    for _ in range(args.repeat):
        wall, (audio, rate) = _timed(lambda: model.generate_custom_voice(**request))
        seconds = sum(len(a) for a in audio) / rate
        whole.append({"wall_s": wall, "audio_s": seconds, "rtf": seconds / wall})

    streamed: dict[int, list[dict[str, float]]] = {}
    for chunk_size in args.chunk_sizes:
        streamed[chunk_size] = []
        for _ in range(args.repeat):
            torch.cuda.synchronize()
            started = time.perf_counter()
            first, seconds = None, 0.0
            for chunk, chunk_rate, _timing in model.generate_custom_voice_streaming(**request, chunk_size=chunk_size):
                if first is None:
                    first = time.perf_counter() - started
                seconds += len(chunk) / chunk_rate
            wall = time.perf_counter() - started
            streamed[chunk_size].append(
                {"first_audio_ms": 1000 * (first or wall), "wall_s": wall, "rtf": seconds / wall}
            )
    return {
        "engine": f"faster-qwen3-tts {faster_qwen3_tts.__version__}",
        "model": str(args.model),
        "dtype": args.dtype,
        "frames": args.frames,
        "device": torch.cuda.get_device_name(),
        "load_s": load_s,
        "capture_s": capture_s,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9,
        "whole": whole,
        "streamed": streamed,
    }


def report(result: dict[str, Any], streams: list[int]) -> str:
    lines = [
        f"## {result['engine']}: {result['frames']} frames ({result['frames'] / FRAME_RATE:.0f} s) per request, "
        f"{result['dtype']}, {result['device']}",
        "",
        f"Loaded in {result['load_s']:.1f} s, CUDA graphs captured in {result['capture_s']:.1f} s, "
        f"peak GPU memory {result['peak_gpu_gb']:.1f} GB.",
        "",
        "| mode | chunk frames | first audio ms (median) | RTF (median) | runs |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    whole_rtf = statistics.median(run["rtf"] for run in result["whole"])
    lines.append(f"| whole file | n/a | n/a | {whole_rtf:.2f} | {len(result['whole'])} |")
    for chunk_size, runs in result["streamed"].items():
        first = statistics.median(run["first_audio_ms"] for run in runs)
        rtf = statistics.median(run["rtf"] for run in runs)
        lines.append(f"| streamed | {chunk_size} | {first:.0f} | {rtf:.2f} | {len(runs)} |")
    lines += [
        "",
        "It serves one request at a time, so N streams share one stream's rate: audio s/s at "
        + ", ".join(f"{n} streams: {whole_rtf:.1f} (each at RTF {whole_rtf / n:.2f})" for n in streams)
        + ".",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a Qwen3-TTS CustomVoice checkpoint folder")
    parser.add_argument("--frames", type=int, default=250)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--chunk-sizes", type=int, nargs="+", default=[12, 4], help="streaming chunk frames (12: its default)"
    )
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        parser.error("faster-qwen3-tts's torch backend needs a CUDA device")
    result = measure(args)
    print(report(result, args.streams))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
