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


def test_streams_decoded_in_batches_equal_their_whole_decodes(cache_dir: Path) -> None:
    """`decode_many`: three streams' chunks batched in changing company (two starting together, one joining
    later with no history, pairs and all three, chunks of 4 to 80 frames, across the transformer's window)
    each equal that stream's own whole decode."""
    model = Qwen3TTSModel.from_pretrained(str(ensure_tiny_checkpoint(cache_dir)), device_map="cpu")
    decoder = model.model.speech_tokenizer.model.decoder
    codes = torch.randint(0, 2048, (3, 16, 150), generator=torch.Generator().manual_seed(11))
    streaming = StreamingDecoder(decoder)
    states = [streaming.new_state() for _ in range(3)]
    parts: list[list[torch.Tensor]] = [[], [], []]
    done = [0, 0, 0]
    with torch.inference_mode():
        whole = decoder(codes).squeeze(1)
        turns = [([0, 1], 4), ([2], 4), ([0, 1, 2], 16), ([1], 33), ([0, 2], 33), ([0, 1, 2], 80)]
        turns += [([2, 0], 17), ([1], 17)]
        for streams, size in turns:
            batch = torch.cat([codes[i : i + 1, :, done[i] : done[i] + size] for i in streams])
            audio = streaming.decode_many([states[i] for i in streams], batch)
            assert audio.shape == (len(streams), size * 1920)
            for row, i in enumerate(streams):
                parts[i].append(audio[row])
                done[i] += size
    assert done == [150, 150, 150]
    for i in range(3):
        assert float((torch.cat(parts[i]) - whole[i]).abs().max()) <= 1e-4, i
    assert float(whole.abs().max()) > 0.05


@pytest.mark.parametrize("arch", ["tiny", "deep"])
def test_a_stream_decodes_to_the_same_bits_alone_and_in_a_batch(cache_dir: Path, arch: str) -> None:
    """A seed replays byte for byte whoever else is served, so a stream's chunk must come out of a batch
    with the very bits it has alone: for the chunk lengths that are batched (from the length the start-up
    check measures on this CPU: 4 frames on an AMD EPYC, 8 on a Sapphire Rapids), in batches of 2 to 8
    streams, a first chunk and one with history, beside a stream that has more history than the others."""
    from tts_service.batch_invariance import decoder_batch_min_frames
    from tts_service.chunk_decoder import STATEFUL_BATCH_MIN_FRAMES, stateful_batch_limit

    model = Qwen3TTSModel.from_pretrained(str(ensure_tiny_checkpoint(cache_dir, arch)), device_map="cpu")
    streaming = StreamingDecoder(model.model.speech_tokenizer.model.decoder)
    lowest = decoder_batch_min_frames(streaming, (4, 8, 16, 32), stateful_batch_limit)
    assert lowest is not None and lowest >= STATEFUL_BATCH_MIN_FRAMES
    generator = torch.Generator().manual_seed(13)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the decoder process runs
    try:
        with torch.inference_mode():
            for rows in (2, 3, 8):
                for size in [size for size in (4, 8, 16, 32) if size >= lowest]:
                    codes = torch.randint(0, 2048, (rows, 16, 2 * size + 5), generator=generator)
                    starts = [5] + [0] * (rows - 1)  # the first stream has 5 frames of history already
                    alone, batched = [], [streaming.new_state() for _ in range(rows)]
                    for row, start in enumerate(starts):
                        state = streaming.new_state()
                        if start:
                            streaming.decode(state, codes[row : row + 1, :, :start])
                        chunks = [codes[row : row + 1, :, start + k * size : start + (k + 1) * size] for k in (0, 1)]
                        alone.append(torch.cat([streaming.decode(state, chunk) for chunk in chunks], dim=-1))
                    streaming.decode(batched[0], codes[:1, :, :5])
                    together = []
                    for k in (0, 1):
                        chunks = [codes[r : r + 1, :, s + k * size : s + (k + 1) * size] for r, s in enumerate(starts)]
                        together.append(streaming.decode_many(batched, torch.cat(chunks)))
                    together = torch.cat(together, dim=-1)
                    for row in range(rows):
                        assert torch.equal(together[row], alone[row][0]), (rows, size, row)
    finally:
        torch.set_num_threads(threads)


def test_the_in_place_snake_activation_gives_qwen_tts_bits(cache_dir: Path) -> None:
    """`StreamingDecoder._snake` replaces qwen-tts's SnakeBeta for speed: it must give the very same bits, for
    every SnakeBeta of the decoder and for one with random alpha and beta (the checkpoint's may be trivial)."""
    model = Qwen3TTSModel.from_pretrained(str(ensure_tiny_checkpoint(cache_dir)), device_map="cpu")
    decoder = model.model.speech_tokenizer.model.decoder
    snakes = [module for module in decoder.modules() if type(module).__name__ == "SnakeBeta"]
    randomized = type(snakes[0])(8)
    with torch.no_grad():
        randomized.alpha.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        randomized.beta.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    streaming = StreamingDecoder(decoder)
    generator = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for snake in [*snakes, randomized]:
            x = torch.randn(2, snake.alpha.numel(), 3000, generator=generator) * 3
            assert torch.equal(streaming._snake(snake, x), snake(x)), snake
            assert torch.equal(streaming._snake(snake, x), snake(x))  # again, from its cached factors
