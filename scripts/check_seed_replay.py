"""Does a seed replay the same audio, byte for byte, whoever else is being served? The README promises it;
the CPU suite proves it (tests/test_seeds_and_segments.py, tests/test_seed_http.py). On a GPU the rows of a
step batch run through kernels chosen for the batch's size (a CUDA graph per bucket, cuBLAS tiles by M),
and streams' decoder windows share calls, so rounding there may depend on the company a request keeps.
This measures it: one seeded, sampled line alone, then joining a running batch, then with others joining
it, as a whole file and as a stream; it prints whether codes and 16-bit audio are identical, and where
they first differ. Exit status 1 when anything differs.

    python scripts/check_seed_replay.py --model tiny --device cpu
    python scripts/check_seed_replay.py --model /tmp/ckpt/random-1.7b-v1 --device cuda
    python scripts/check_seed_replay.py --model /tmp/ckpt/random-1.7b-v1 --device cuda --batch-invariant true

`--batch-invariant` sets TTS_BATCH_INVARIANT (unset: the service's default, on the CPU only).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks.workload import TEXT as OTHERS_TEXT  # noqa: E402
from benchmarks.workload import VOICES  # noqa: E402

from tts_service.dev.tiny_checkpoint import ensure_tiny_checkpoint  # noqa: E402
from tts_service.engine import SynthesisRequest, TTSEngine  # noqa: E402
from tts_service.request_handle import RequestHandle  # noqa: E402
from tts_service.settings import Settings  # noqa: E402

TEXT = "The harbour master raises his lantern and calls across the water."
SPEAKER, LANGUAGE, SEED = "Uncle_Fu", "english", 1234


@dataclass
class Heard:
    codes: np.ndarray  # [frames, 16]
    pcm16: np.ndarray  # what a WAV carries
    batch: int  # the largest step batch it shared


def hear(handle: RequestHandle, stream: bool) -> Heard:
    """Drain a request as its route does: a stream chunk by chunk, a whole file collected."""
    audio = np.concatenate(list(handle)) if stream else handle.collect()
    end = handle.end
    if end is None or end.error:
        raise RuntimeError(f"{handle.request_id} failed: {None if end is None else end.error}")
    return Heard(end.codes, (np.clip(audio, -1, 1) * 32767).round().astype("<i2"), end.max_batch)


def compare(alone: Heard, other: Heard) -> dict:
    frames = min(len(alone.codes), len(other.codes))
    differing = np.flatnonzero((alone.codes[:frames] != other.codes[:frames]).any(axis=1))
    first_frame = int(differing[0]) if len(differing) else (None if len(alone.codes) == len(other.codes) else frames)
    samples = min(len(alone.pcm16), len(other.pcm16))
    diff = np.abs(alone.pcm16[:samples].astype(np.int32) - other.pcm16[:samples].astype(np.int32))
    return {
        "same_bytes": len(alone.pcm16) == len(other.pcm16) and not diff.any(),
        "first_differing_frame": first_frame,
        "samples_differing": int((diff > 0).sum()) + abs(len(alone.pcm16) - len(other.pcm16)),
        "largest_difference_lsb": int(diff.max()) if samples else 0,
        "batch": other.batch,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, or a checkpoint folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--frames", type=int, default=120, help="at most this many frames per request")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "tts_service")
    parser.add_argument("--batch-invariant", choices=("default", "true", "false"), default="default")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model = str(ensure_tiny_checkpoint(args.cache_dir)) if args.model == "tiny" else args.model
    settings = Settings(
        model=model,
        device=args.device,
        dtype=args.dtype,
        greedy=False,
        max_batch_size=16,
        max_new_tokens=args.frames,
        cache_dir=args.cache_dir,
        batch_invariant=None if args.batch_invariant == "default" else args.batch_invariant == "true",
    )
    engine = TTSEngine.load(settings)
    quick = engine.scheduler.quick_start  # a lone stream's chunks then differ from one's in company
    print(f"batch invariance: {engine.scheduler.invariance}; quick start (TTS_STREAM_QUICK_START): {quick}")
    line = SynthesisRequest(TEXT, engine.resolve_speaker(SPEAKER), engine.resolve_language(LANGUAGE), seed=SEED)
    words = OTHERS_TEXT.split()
    others = [  # seven other lines of different lengths, voices and seeds
        SynthesisRequest(" ".join(words[: 4 + 5 * i]), speaker, language, seed=i)
        for i, (speaker, language) in enumerate(VOICES * 2)
    ][:7]
    results: dict[str, dict] = {}
    for stream in (False, True):
        route = "stream" if stream else "whole file"
        alone = hear(engine.submit(line, f"alone-{route}", stream=stream), stream)
        # It joins a running batch: the others are already stepping when it is prefilled.
        company = [engine.submit(o, f"before-{route}-{i}", stream=stream) for i, o in enumerate(others)]
        time.sleep(0.05)
        joining = hear(engine.submit(line, f"joining-{route}", stream=stream), stream)
        for handle in company:
            list(handle)
        # The others join it: it is prefilled alone, and the batch grows around it.
        handle = engine.submit(line, f"joined-{route}", stream=stream)
        time.sleep(0.05)
        company = [engine.submit(o, f"after-{route}-{i}", stream=stream) for i, o in enumerate(others)]
        joined = hear(handle, stream)
        for other in company:
            list(other)
        for case, heard in (("joining a running batch", joining), ("others joining it", joined)):
            outcome = compare(alone, heard)
            results[f"{route}, {case}"] = outcome
            print(
                f"{route:10} {case:24} batch {outcome['batch']:2}  frames {len(alone.codes)} / {len(heard.codes)}  "
                f"same bytes: {outcome['same_bytes']}  first differing frame: {outcome['first_differing_frame']}  "
                f"samples differing: {outcome['samples_differing']} (at most {outcome['largest_difference_lsb']} LSB)"
            )
    same = all(r["same_bytes"] for r in results.values())
    print("ALL THE SAME BYTES" if same else "SOME DIFFER: the seed does not replay byte for byte in company here")
    if args.json:
        report = {"device": str(engine.scheduler.device), "invariance": str(engine.scheduler.invariance)}
        args.json.write_text(json.dumps({**report, "results": results}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
