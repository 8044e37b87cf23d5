"""The CPU-checkable parts of the GPU path: bucket choice for the captured graphs, and that a window
padded up to its bucket computes the active rows exactly as the unpadded window does (the rows beyond
are free slots, computing harmlessly in place)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tts_service import frame_step as fs
from tts_service.cuda_graphs import batch_buckets, bucket_for, kv_buckets, prompt_buckets
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


def test_prompt_buckets_pad_a_prompt_by_at_most_half() -> None:
    assert prompt_buckets(1024) == [16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    assert prompt_buckets(100) == [16, 32, 64, 96, 100] and prompt_buckets(10) == [10]
    buckets = prompt_buckets(2047)
    assert buckets[-1] == 2047
    assert all(bucket_for(n, buckets) <= max(16, 2 * n) for n in range(1, 2048))
    assert all(bucket_for(n, buckets) <= 1.5 * n for n in range(64, 2048))


class _Replaying:
    """Stands in for a captured CUDA graph on the CPU: a replay runs the captured function again, on the
    same static inputs, as the graph's kernels would."""

    def __init__(self, run) -> None:
        self.run = run

    def replay(self) -> None:
        self.run()


def _graphed_prefill(
    tiny_dir: Path, cache_dir: Path, monkeypatch, lengths: list[int], failing: int = 0, fewer_kernels: bool = False
):
    """An engine (batch invariance off, as on a GPU) whose prefill goes through `GraphedPrefill` with these
    length buckets, CUDA's capture stood in by `_Replaying` (the CPU has no CUDA graphs): what is tested is
    everything around the graph, its static inputs, padding, bucket choice and fallbacks. The capture of
    the `failing` length raises, as a capture can. `fewer_kernels`: the step's forms of a GPU in bf16."""
    from tts_service import cuda_graphs

    def stand_in(run, pool):
        result = run()
        if failing and len(captured) == lengths.index(failing):
            captured.append(None)
            raise RuntimeError("operation not permitted when stream is capturing")
        captured.append(run)
        return _Replaying(run), result

    captured: list = []
    monkeypatch.setattr(cuda_graphs, "capture", stand_in)
    engine = TTSEngine.load(
        Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu", batch_invariant=False)
    )
    scheduler = engine.scheduler
    scheduler.weights = fs.with_fewer_kernels(scheduler.weights, fewer_kernels)
    prefill = cuda_graphs.GraphedPrefill(scheduler.weights, scheduler.state, lengths=lengths, pool=object())
    prefill.capture_all(scheduler.sampling_params(0))
    assert not scheduler.state.active.any()  # capture ran in a free slot, which it released
    scheduler.prefill_fn = prefill
    return engine, prefill


def _codes(engine: TTSEngine, requests: list, prefix: str) -> list:
    with engine.scheduler._wake:  # the loop admits them in one turn (it takes the queue under this lock)
        handles = [engine.submit(r, f"{prefix}-{i}", stream=False) for i, r in enumerate(requests)]
    for handle in handles:
        list(handle)
    assert all(handle.end.error is None for handle in handles)
    return [handle.end.codes for handle in handles]


@pytest.mark.parametrize("fewer_kernels", [False, True])
def test_a_prefill_replayed_from_its_length_bucket_equals_qwen_tts(
    tiny_dir: Path, cache_dir: Path, monkeypatch, fewer_kernels: bool
) -> None:
    """Prompts copied into their bucket's static inputs, zero-padded to its length and replayed, one after
    another (two of them in the same bucket): each request's codes equal qwen-tts's alone, greedy. Then the
    same group prefilled eagerly as one batch, as when the replays' measured times exceed an eager prefill's."""
    from tests.oracle import ORACLE_REQUESTS, reference

    engine, prefill = _graphed_prefill(tiny_dir, cache_dir, monkeypatch, [64, 128, 192], fewer_kernels=fewer_kernels)
    requests = [ORACLE_REQUESTS[i] for i in (0, 1, 3)]  # prompts of 108, 52 and 78 tokens
    build = engine.scheduler.prompts.build
    lengths = [int(build(r.text, r.speaker, r.language, r.instruct, None).shape[0]) for r in requests]
    buckets = [bucket_for(n, prefill.lengths) for n in lengths]
    assert len(set(buckets)) < len(buckets) and all(n < b for n, b in zip(lengths, buckets, strict=True)), buckets
    expected = [reference(engine, r)[0] for r in requests]
    assert prefill.replayed == 0 and prefill.eager_groups == 0
    for i, request in enumerate(requests):  # alone
        np.testing.assert_array_equal(_codes(engine, [request], f"alone-{i}")[0], expected[i])
    assert prefill.replayed == 3 and prefill.eager_groups == 0
    prefill.eager_s = float("inf")  # together, replayed one by one
    for codes, want in zip(_codes(engine, requests, "replayed"), expected, strict=True):
        np.testing.assert_array_equal(codes, want)
    assert prefill.replayed == 6 and prefill.eager_groups == 0
    prefill.eager_s = 0.0  # together, one eager batch
    for codes, want in zip(_codes(engine, requests, "eager"), expected, strict=True):
        np.testing.assert_array_equal(codes, want)
    assert prefill.replayed == 6 and prefill.eager_groups == 1


def test_a_prompt_past_the_largest_bucket_or_of_a_failed_capture_is_prefilled_eagerly(
    tiny_dir: Path, cache_dir: Path, monkeypatch
) -> None:
    from tests.oracle import ORACLE_REQUESTS, reference

    engine, prefill = _graphed_prefill(tiny_dir, cache_dir, monkeypatch, [8, 16, 24], failing=16)
    scheduler = engine.scheduler
    assert sorted(prefill.graphs) == [8, 24]
    request = ORACLE_REQUESTS[0]
    length = int(scheduler.prompts.build(request.text, request.speaker, request.language, "", None).shape[0])
    assert length > 24
    np.testing.assert_array_equal(_codes(engine, [request], "long")[0], reference(engine, request)[0])
    assert prefill.replayed == 0 and prefill.eager_groups == 1
    assert prefill._graph_for(12) is None and prefill._graph_for(20) is not None


class _StoodInGraph:
    """A captured graph stood in on the CPU: a replay runs the step again into the captured outputs."""

    def __init__(self, run, outputs) -> None:
        self.run, self.outputs = run, outputs

    def replay(self) -> None:
        for output, fresh in zip(self.outputs, self.run(), strict=True):
            output.copy_(fresh)


@pytest.fixture
def stood_in_capture(monkeypatch) -> list:
    """CUDA graph capture stood in by running the step (as capture's warm-up does). Returns the attended
    lengths of each frame step captured, as they are captured."""
    from tts_service import cuda_graphs

    def capture(run, pool):
        outputs = run()
        return _StoodInGraph(run, outputs), outputs

    lengths: list = []
    capture_all = cuda_graphs.GraphedFrameStep.capture_all
    monkeypatch.setattr(
        cuda_graphs.GraphedFrameStep, "capture_all", lambda self: lengths.append(self.kv_lengths) or capture_all(self)
    )
    monkeypatch.setattr(cuda_graphs, "capture", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    return lengths


def _graphs_and_eager_frames(scheduler, w: fs.Weights, kv_len: int) -> dict[str, torch.Tensor]:
    """Two greedy frames of one request through the scheduler's step and through the eager step."""
    prompt = scheduler.prompts.build("A line.", "ryan", "english")
    frames = {}
    for name, step in (("graphs", scheduler.step_fn), ("eager", fs.frame_step)):
        with torch.inference_mode():
            fs.prefill(w, scheduler.state, [0], [prompt], [scheduler.sampling_params(0)])
            frames[name] = torch.stack([step(w, scheduler.state, 1, kv_len, False)[0][0].clone() for _ in range(2)])
            fs.release(scheduler.state, 0)
    return frames


def test_a_step_with_the_triton_attention_is_captured_at_one_length(
    stood_in_capture: list, tiny_dir: Path, cache_dir: Path
) -> None:
    """With the decode attention over live keys a row reads its own keys whatever the step's `kv_len`, so the
    service captures one length (the cache's) per batch bucket and sampling mode, and every `kv_len` the
    scheduler asks for replays it. (Capture stood in; the Triton kernels in the interpreter.)"""
    pytest.importorskip("triton")
    from tts_service import cuda_graphs

    engine = TTSEngine.load(Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, max_batch_size=2))
    scheduler = engine.scheduler
    scheduler.weights = w = fs.with_fewer_kernels(scheduler.weights, True, triton=True)
    with torch.inference_mode():
        scheduler._capture_graphs(prefill_graphs=False)
    max_len = scheduler.state.max_len
    assert stood_in_capture == [[max_len]] and scheduler.weights is w and w.talker.triton_attention
    graphed = scheduler.step_fn
    assert isinstance(graphed, cuda_graphs.GraphedFrameStep)
    assert set(graphed.graphs) == {(n, max_len, sample) for n in (1, 2) for sample in (False, True)}
    frames = _graphs_and_eager_frames(scheduler, w, 32)
    assert torch.equal(frames["graphs"], frames["eager"])
    assert len(graphed.graphs) == 4  # kv_len 32 replayed the one length's graph


def test_a_step_whose_triton_kernels_cannot_be_captured_is_captured_without_them(
    monkeypatch, stood_in_capture: list, tiny_dir: Path, cache_dir: Path, caplog
) -> None:
    """Triton's kernels pass `fused_kernels.usable` eagerly before capture; should capturing them fail all the
    same, the step is captured without them and serves, rather than the service failing to start. A failure
    without them is not hidden. (Capture stands in here by running the step, as capture's warm-up does.)"""
    import logging

    from tts_service import cuda_graphs, fused_kernels

    engine = TTSEngine.load(Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, max_batch_size=2))
    scheduler = engine.scheduler
    eager = scheduler.weights
    scheduler.weights = fs.with_fewer_kernels(eager, True, triton=True)

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(fused_kernels, "qk_norm_rope_into_cache", refuse)
    with caplog.at_level(logging.ERROR, logger="tts_service.scheduler"), torch.inference_mode():
        scheduler._capture_graphs(prefill_graphs=False)
    assert "capturing the frame step with its Triton kernels failed" in caplog.text
    w = scheduler.weights
    assert w.talker.fewer_kernels and not w.talker.triton_kernels and not w.triton_sampling
    assert not w.talker.triton_attention
    max_len = scheduler.state.max_len  # the Triton attention's one length, then the buckets
    assert stood_in_capture == [[max_len], cuda_graphs.kv_buckets(max_len)]
    assert isinstance(scheduler.step_fn, cuda_graphs.GraphedFrameStep) and scheduler.step_fn.weights is w
    frames = _graphs_and_eager_frames(scheduler, w, 128)
    assert torch.equal(frames["graphs"], frames["eager"])

    monkeypatch.setattr(cuda_graphs, "capture", refuse)  # without Triton's kernels a failure is the service's
    with pytest.raises(RuntimeError, match="capturing"):
        scheduler._capture_graphs(prefill_graphs=False)
