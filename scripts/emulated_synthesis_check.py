"""Synthesize with the step engine on this machine's CPU and check its codes against qwen-tts's own
generate, greedy: the oracle of the test suite, runnable where the suite is not (under aarch64 emulation
by scripts/emulated_import_aarch64.sh). Prints one line per request and exits 1 on any difference.

    python scripts/emulated_synthesis_check.py CHECKPOINT_DIR OUT_DIR
"""

from __future__ import annotations

import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.oracle

from tests.oracle import ORACLE_REQUESTS, reference  # noqa: E402
from tts_service.engine import TTSEngine  # noqa: E402
from tts_service.settings import Settings  # noqa: E402

logger = logging.getLogger("emulated_synthesis_check")
REQUESTS = ORACLE_REQUESTS[1:3]  # 8 and 23 frames on the tiny checkpoint


def main(checkpoint: Path, out_dir: Path) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    started = time.perf_counter()
    engine = TTSEngine.load(Settings(model=str(checkpoint), greedy=True, device="cpu", max_batch_size=2))
    print(f"{platform.machine()} torch {torch.__version__}: engine loaded in {time.perf_counter() - started:.0f} s")
    handles = [engine.submit(r, f"check-{i}", stream=False) for i, r in enumerate(REQUESTS)]  # share steps
    failures = 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, (request, handle) in enumerate(zip(REQUESTS, handles, strict=True)):
        audio = handle.collect()
        end = handle.end
        assert end is not None
        codes, _ = reference(engine, request)
        equal = end.error is None and np.array_equal(end.codes, codes)
        failures += not equal
        path = out_dir / f"check-{index}.wav"
        path.write_bytes(engine.synthesize(request).wav)
        print(
            f"request {index}: {end.frames} frames, {len(audio) / engine.sample_rate:.2f} s of audio, batch "
            f"{end.max_batch}, codes equal to qwen-tts: {'yes' if equal else 'NO'}; {path.name} "
            f"{path.stat().st_size} bytes"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
