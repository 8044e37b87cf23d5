"""How long the CPU's start-up check of the stream decoder's batch invariance takes at a model's sizes,
measured and then read back from a verdict store as a restart reads it (`tts_service.verdict_store`).

Only the speech decoder is built (random weights, `--arch` sizes; the released models share one), so the
1.7B talker need not be: its product-layout check takes about 3 s at 32 slots (README).

    python scripts/startup_checks.py --arch 1.7b
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

import tts_service.batch_invariance as checks
from tts_service.chunk_decoder import stateful_batch_limit
from tts_service.dev.tiny_checkpoint import ARCHS, _speech_tokenizer_config
from tts_service.engine import import_qwen_tts
from tts_service.invariance_plan import DECODER_CHECK_FRAMES
from tts_service.scheduler import CPU_LOOP_THREADS
from tts_service.streaming_decoder import StreamingDecoder
from tts_service.verdict_store import FILE_NAME, VerdictStore


def speech_decoder(arch: str) -> torch.nn.Module:
    import_qwen_tts()
    from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2DecoderConfig
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Decoder

    torch.manual_seed(0)
    config = Qwen3TTSTokenizerV2DecoderConfig(**_speech_tokenizer_config(ARCHS[arch])["decoder_config"])
    return Qwen3TTSTokenizerV2Decoder(config).eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="1.7b")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    streaming = StreamingDecoder(speech_decoder(args.arch))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        store = VerdictStore(Path(folder) / FILE_NAME)
        for run in ("first start: measured", "restart: read from the store"):
            checks._decoder_verdicts.clear()  # as in a new process
            started = time.perf_counter()
            verdict = checks.decoder_batch_min_frames(
                streaming, DECODER_CHECK_FRAMES, stateful_batch_limit, CPU_LOOP_THREADS, store=store
            )
            rows.append((run, verdict, time.perf_counter() - started))
    print(f"\nstream decoder check at --arch {args.arch}, windows of {list(DECODER_CHECK_FRAMES)} frames\n")
    print("| start | batched from, frames | seconds |\n| --- | ---: | ---: |")
    for run, verdict, seconds in rows:
        print(f"| {run} | {verdict} | {seconds:.2f} |")
    print(f"\na restart saves {rows[0][2] - rows[1][2]:.1f} s")
    return 0 if rows[0][1] == rows[1][1] else 1


if __name__ == "__main__":
    sys.exit(main())
