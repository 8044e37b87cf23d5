"""The stateful streaming decoder against qwen-tts's own whole-utterance decode (float32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from qwen_tts import Qwen3TTSModel

from tts_service.dev.tiny_checkpoint import ensure_tiny_checkpoint
from tts_service.streaming_decoder import StreamingDecoder


@pytest.mark.parametrize("arch", ["tiny", "deep"])
def test_chunk_by_chunk_equals_the_whole_decode(cache_dir: Path, arch: str) -> None:
    """Chunks of uneven sizes (1 to 80 frames), 150 frames in all: twice the transformer's 72-frame window,
    so its sliding cache, every convolution's history and every transposed convolution's overlap are used."""
    model = Qwen3TTSModel.from_pretrained(str(ensure_tiny_checkpoint(cache_dir, arch)), device_map="cpu")
    decoder = model.model.speech_tokenizer.model.decoder
    codes = torch.randint(0, 2048, (2, 16, 150), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        whole = decoder(codes).squeeze(1)
        streaming = StreamingDecoder(decoder)
        state, parts, start = streaming.new_state(), [], 0
        for size in (4, 16, 16, 1, 33, 80):
            parts.append(streaming.decode(state, codes[..., start : start + size]))
            start += size
    streamed = torch.cat(parts, dim=-1)
    assert streamed.shape == whole.shape == (2, 150 * 1920)
    assert float((streamed - whole).abs().max()) <= 1e-4
    assert float(whole.abs().max()) > 0.05  # real audio, not silence on both sides
