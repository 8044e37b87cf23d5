"""The batch-invariance checks' verdicts kept on disk (`tts_service.verdict_store`): a restart on the same
machine reads them instead of measuring (about 45 s at the released sizes on a 2-core CPU); another
machine, torch build or check code measures afresh; a damaged or unwritable file never fails a start."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import tts_service.batch_invariance as checks
import tts_service.verdict_store as verdict_store
from tts_service import frame_step as fs
from tts_service.engine import TTSEngine
from tts_service.invariance_plan import InvariancePlan
from tts_service.verdict_store import FILE_NAME, VerdictStore


def any_verdict(verdict: object) -> bool:  # a validator that takes every verdict
    return True


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often each check really measures (a restart: the process's own memo starts empty)."""
    counts = {"products": 0, "decoder": 0}
    rows_keep_their_bits, decoder_keeps_bits = checks.rows_keep_their_bits, checks._decoder_keeps_bits

    def products(*args, **kwargs) -> bool:
        counts["products"] += 1
        return rows_keep_their_bits(*args, **kwargs)

    def decoder(*args, **kwargs) -> bool:
        counts["decoder"] += 1
        return decoder_keeps_bits(*args, **kwargs)

    monkeypatch.setattr(checks, "rows_keep_their_bits", products)
    monkeypatch.setattr(checks, "_decoder_keeps_bits", decoder)
    monkeypatch.setattr(checks, "_decoder_verdicts", {})
    return counts


def _plan(engine: TTSEngine, store: VerdictStore) -> InvariancePlan:
    model = engine.scheduler.model
    return InvariancePlan.choose(
        True,
        on_cuda=False,
        slots=8,
        stateful_decoding=True,
        shapes=fs.product_shapes(model),
        speech_decoder=model.speech_tokenizer.model.decoder,
        store=store,
    )


def test_a_restart_reads_the_verdicts_this_machine_measured(
    engine: TTSEngine, tmp_path: Path, measured: dict[str, int], monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    store = VerdictStore(tmp_path / FILE_NAME)
    first = _plan(engine, store)
    assert measured["products"] > 0 and measured["decoder"] > 0
    entries = json.loads(store.path.read_text())
    assert sorted(entry["check"] for entry in entries.values()) == [checks.PRODUCT_CHECK, checks.DECODER_CHECK]
    assert [entry["verdict"] for entry in entries.values() if entry["check"] == checks.DECODER_CHECK] == [
        first.stateful_batch_min_frames
    ]

    measured.update(products=0, decoder=0)
    monkeypatch.setattr(checks, "_decoder_verdicts", {})  # a new process
    with caplog.at_level(logging.INFO, logger="tts_service.batch_invariance"):
        assert _plan(engine, store) == first
    assert measured == {"products": 0, "decoder": 0}
    assert caplog.text.count(f"kept in {store.path}") == 2


@pytest.mark.parametrize("change", ["machine", "check code"])
def test_another_machine_or_check_measures_afresh(
    engine: TTSEngine, tmp_path: Path, measured: dict[str, int], monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    store = VerdictStore(tmp_path / FILE_NAME)
    first = _plan(engine, store)
    measured.update(products=0, decoder=0)
    monkeypatch.setattr(checks, "_decoder_verdicts", {})
    if change == "machine":
        monkeypatch.setattr(verdict_store, "machine_fingerprint", lambda: "another processor")
    else:
        monkeypatch.setattr(verdict_store, "checks_code", lambda: "a changed check")
    assert _plan(engine, store) == first
    assert measured["products"] > 0 and measured["decoder"] > 0
    assert len(json.loads(store.path.read_text())) == 4  # both machines' (or checks') verdicts kept


def test_a_verdict_that_nothing_holds_is_kept_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[checks.ProductLayout] = []

    def never(shapes, layout, *args) -> bool:
        calls.append(layout)
        return False

    monkeypatch.setattr(checks, "rows_keep_their_bits", never)
    store = VerdictStore(tmp_path / FILE_NAME)
    shapes = [checks.ProductShape(64, 96)]
    assert checks.choose_layout(shapes, 8, 1, (2, 4), 8, store=store) is None
    assert len(calls) == 6
    assert checks.choose_layout(shapes, 8, 1, (2, 4), 8, store=store) is None
    assert len(calls) == 6  # read, not measured
    assert checks.choose_layout(shapes, 16, 1, (2, 4), 16, store=store) is None
    assert len(calls) == 12  # other slots: measured


def test_a_kept_verdict_of_the_wrong_form_is_measured_afresh(
    engine: TTSEngine, tmp_path: Path, measured: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry whose verdict the check could not have given (a hand-edited file, say) is not trusted."""
    store = VerdictStore(tmp_path / FILE_NAME)
    first = _plan(engine, store)
    entries = json.loads(store.path.read_text())
    for entry in entries.values():
        entry["verdict"] = [1, 2, 3] if entry["check"] == checks.PRODUCT_CHECK else 5  # 5: not a checked length
    store.path.write_text(json.dumps(entries))
    measured.update(products=0, decoder=0)
    monkeypatch.setattr(checks, "_decoder_verdicts", {})
    assert _plan(engine, store) == first
    assert measured["products"] > 0 and measured["decoder"] > 0


def test_a_damaged_or_unwritable_file_never_fails_a_start(tmp_path: Path, caplog) -> None:
    damaged = VerdictStore(tmp_path / FILE_NAME)
    damaged.path.write_text('{"truncated": ')
    assert damaged.get("check", (1,), any_verdict) is None
    damaged.put("check", (1,), 4, 0.5)
    assert damaged.get("check", (1,), any_verdict)["verdict"] == 4  # rewritten whole
    assert damaged.get("check", (2,), any_verdict) is None
    assert [p.name for p in tmp_path.iterdir()] == [FILE_NAME]  # no temporary file left

    (tmp_path / "a-file").write_text("")
    unwritable = VerdictStore(tmp_path / "a-file" / FILE_NAME)  # its folder cannot be made
    with caplog.at_level(logging.WARNING, logger="tts_service.verdict_store"):
        unwritable.put("check", (1,), 4, 0.5)
    assert "could not keep a start-up check's verdict" in caplog.text
    assert unwritable.get("check", (1,), any_verdict) is None


def test_the_engine_keeps_its_verdicts_in_the_cache_dir(engine: TTSEngine) -> None:
    """TTSEngine.load (the service's path) gives the scheduler a store in TTS_CACHE_DIR."""
    entries = json.loads((engine.settings.cache_dir / FILE_NAME).read_text())
    assert {checks.PRODUCT_CHECK, checks.DECODER_CHECK} <= {entry["check"] for entry in entries.values()}
