"""The CPU-checkable parts of the GPU path: bucket choice for the captured graphs, and that a window
padded up to its bucket computes the active rows exactly as the unpadded window does (the rows beyond
are free slots, computing harmlessly in place)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tts_service import frame_step as fs
from tts_service.cuda_graphs import batch_buckets, bucket_for, kv_buckets
from tts_service.engine import TTSEngine
from tts_service.settings import Settings


def test_batch_buckets_cover_every_size_up_to_the_slot_count() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(100)[-3:] == [80, 96, 100]
    for slots in (1, 3, 8, 33, 64, 256):
        buckets = batch_buckets(slots)
        assert buckets[-1] == slots and buckets == sorted(set(buckets))
        assert all(bucket_for(n, buckets) >= n for n in range(1, slots + 1))


def test_kv_buckets_and_bucket_choice() -> None:
    assert kv_buckets(3584) == [128, 256, 512, 1024, 2048, 3584]
    assert kv_buckets(100) == [100]
    assert bucket_for(129, kv_buckets(3584)) == 256 and bucket_for(128, kv_buckets(3584)) == 128
    with pytest.raises(ValueError, match="exceeds"):
        bucket_for(3585, kv_buckets(3584))


def test_a_window_padded_to_its_bucket_computes_the_active_rows_the_same(tiny_dir: Path, cache_dir: Path) -> None:
    engine = TTSEngine.load(Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, max_batch_size=8))
    scheduler = engine.scheduler
    w, s = scheduler.weights, scheduler.state
    prompts = [scheduler.prompts.build(t, "ryan", "english") for t in ("First line.", "Second, longer line here.")]
    with torch.inference_mode():
        fs.prefill(w, s, [0, 1], prompts, [scheduler.sampling_params(i) for i in (0, 1)])
        fs.release(s, 1)  # a free slot inside the window
        fs.prefill(w, s, [2], prompts[:1], [scheduler.sampling_params(2)])
        saved = {k: (v.clone() if isinstance(v, torch.Tensor) else [t.clone() for t in v]) for k, v in vars(s).items()}
        exact = [fs.frame_step(w, s, 3, 64, False) for _ in range(4)]
        for key, value in saved.items():
            current = getattr(s, key)
            pairs = zip(current, value, strict=True) if isinstance(value, list) else [(current, value)]
            for c, v in pairs:
                c.copy_(v)
        padded = [fs.frame_step(w, s, bucket_for(3, batch_buckets(8)), kv_buckets(3584)[0], False) for _ in range(4)]
    for (frames, done), (frames_b, done_b) in zip(exact, padded, strict=True):
        for row in (0, 2):  # the active rows; row 1 is a free slot
            assert torch.equal(frames[row], frames_b[row]) and torch.equal(done[row], done_b[row])


def test_a_decoder_window_length_that_cannot_be_captured_leaves_the_others_captured(monkeypatch) -> None:
    """A window length whose decode cannot be captured as a CUDA graph (say a host sync at 1 frame) is
    decoded eagerly, and only it: the other lengths keep their graphs. (CUDA's graph API stands in here by
    context managers that run the decoder as capture would: the CPU has no CUDA.)"""
    import contextlib

    from tts_service.chunk_decoder import ChunkDecoder

    class Decoder(torch.nn.Module):
        total_upsample = 1920

        def forward(self, codes: torch.Tensor) -> torch.Tensor:
            if codes.shape[-1] == 1:
                raise RuntimeError("operation not permitted when stream is capturing")
            return torch.zeros(codes.shape[0], 1, codes.shape[-1] * self.total_upsample)

    class Graph:
        def replay(self) -> None:
            pass

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None, stream=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    decoder = ChunkDecoder(Decoder(), 1920, torch.device("cpu"), threaded=False)
    decoder.stream = object()  # as on a GPU
    decoder.capture((1, 2, 4))
    assert decoder.graph_lengths == (2, 4)
    assert {length for _, length in decoder._graphs} == {2, 4}
    assert decoder._graph_for(1, 1) is None and decoder._graph_for(3, 4) is not None
