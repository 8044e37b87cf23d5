"""The engine's GPU path (CUDA graphs, decoder thread and stream, pinned hand-off read one step late)
against plain qwen-tts on the same GPU, float32 greedy: the codec codes must be identical, for requests
alone, joining a running batch, and a long text spoken as segments.

    python scripts/check_gpu_equality.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.oracle import ORACLE_REQUESTS as REQUESTS  # noqa: E402
from tests.oracle import reference  # noqa: E402
from tts_service.dev.tiny_checkpoint import ensure_tiny_checkpoint  # noqa: E402
from tts_service.engine import SynthesisRequest, TTSEngine  # noqa: E402
from tts_service.settings import Settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", default="tiny")
    args = parser.parse_args()
    cache = Path(tempfile.mkdtemp())
    model = str(ensure_tiny_checkpoint(cache, args.arch))
    engine = TTSEngine.load(
        Settings(model=model, device=args.device, dtype="float32", greedy=True, max_new_tokens=160, cache_dir=cache)
    )
    failures = 0

    def oracle(r: SynthesisRequest) -> np.ndarray:  # qwen-tts per segment, as the engine cuts the text
        parts = [SynthesisRequest(s, r.speaker, r.language, r.instruct) for s in engine.segments(r.text)]
        return np.concatenate([reference(engine, part)[0] for part in parts])

    expected = {r.text: oracle(r) for r in REQUESTS}
    print("reference lengths:", [len(expected[r.text]) for r in REQUESTS])
    for r in REQUESTS:  # alone
        handle = engine.submit(r, f"alone-{len(r.text)}", stream=False)
        list(handle)
        same = np.array_equal(handle.end.codes, expected[r.text])
        failures += not same
        print(f"alone  {r.text[:28]!r:32} frames {handle.end.frames:4} equal {same}")
    handles = []
    for i, r in enumerate(REQUESTS):  # joining a running batch, streamed
        handles.append((r, engine.submit(r, f"joined-{i}", stream=True)))
        time.sleep(0.05)
    for r, handle in handles:
        audio = np.concatenate(list(handle))
        same = np.array_equal(handle.end.codes, expected[r.text]) and len(audio) == handle.end.frames * 1920
        failures += not same
        print(f"joined {r.text[:28]!r:32} frames {handle.end.frames:4} shared {handle.end.shared_steps:4} equal {same}")
    long_text = " ".join(f"Sentence {i} tells the visitor about room {i} and its view." for i in range(1, 14))
    request = engine.request_for(long_text, "Ryan", "english")
    segments = engine.segments(request.text)
    handle = engine.submit(request, "long", stream=True)
    list(handle)
    want = oracle(request)
    same = np.array_equal(handle.end.codes, want)
    failures += not same
    print(f"long text, {len(segments)} segments, frames {handle.end.frames}: equal {same}")
    print("ALL EQUAL" if failures == 0 else f"{failures} MISMATCHES")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
