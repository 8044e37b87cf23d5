"""The saved-voice library on disk (issue 16's store): persistence, case-insensitive unique names,
concurrent creates and deletes, crash safety, and no client text used as a path."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tts_service.voice_library import (
    DuplicateVoiceName,
    UnknownVoice,
    VoiceLibrary,
    VoiceStoreError,
)

FILES = {"prompt.safetensors": b"\x80\x04prompt-tensors", "reference.wav": b"RIFF....WAVEfmt "}


def test_a_voice_is_listed_found_by_id_or_name_and_survives_a_reopen(tmp_path: Path) -> None:
    library = VoiceLibrary(tmp_path)
    voice = library.create("Harbour Master", "clone", "Ahoy there.", "english", FILES)
    assert voice.id.startswith("voice_") and voice.files == ("prompt.safetensors", "reference.wav")
    assert library.get(voice.id) == library.get("harbour master") == library.get(" HARBOUR MASTER ") == voice
    library.close()

    reopened = VoiceLibrary(tmp_path)
    assert reopened.list() == [voice]
    assert reopened.file(voice, "prompt.safetensors").read_bytes() == FILES["prompt.safetensors"]
    assert reopened.file(voice, "prompt.safetensors").parent.name == voice.id  # the folder is the id, not the name


def test_names_are_unique_case_insensitively_and_the_first_voice_stays_intact(tmp_path: Path) -> None:
    library = VoiceLibrary(tmp_path)
    first = library.create("Robot", "design", "A tinny robot.", "english", {"preview.wav": b"one"})
    with pytest.raises(DuplicateVoiceName):
        library.create("  rOBOT ", "design", "Another.", "english", {"preview.wav": b"two"})
    assert library.list() == [first]
    assert library.file(first, "preview.wav").read_bytes() == b"one"
    assert sorted(p.name for p in (tmp_path / "voices").iterdir()) == [first.id]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_eight_concurrent_creates_all_land_and_a_contended_name_goes_to_one(tmp_path: Path) -> None:
    library = VoiceLibrary(tmp_path)
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda i: library.create(f"voice {i}", "clone", "", "auto", FILES), range(8)))
    assert sorted(v.name for v in library.list()) == sorted(v.name for v in made) and len(made) == 8

    def contend(i: int) -> str:
        try:
            library.create("Companion", "clone", str(i), "auto", FILES)
            return "created"
        except DuplicateVoiceName:
            return "duplicate"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(contend, range(8)))
    assert outcomes.count("created") == 1 and outcomes.count("duplicate") == 7
    assert len(list((tmp_path / "voices").iterdir())) == 9


def _create_in_process(root: str, start: int) -> None:
    library = VoiceLibrary(root)
    for i in range(start, start + 4):
        library.create(f"process voice {i}", "clone", "", "auto", FILES)
    try:
        library.create("Shared", "design", str(start), "auto", {"preview.wav": b"x"})
    except DuplicateVoiceName:
        pass


def test_two_processes_share_one_library(tmp_path: Path) -> None:
    # Fresh interpreters (not multiprocessing's spawn, which re-runs whatever __main__ is at the time).
    code = "import sys; from tests.test_voice_library import _create_in_process as c; c(sys.argv[1], int(sys.argv[2]))"
    workers = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(n)], cwd=REPO_ROOT, stderr=subprocess.PIPE)
        for n in (0, 4)
    ]
    for worker in workers:
        _, errors = worker.communicate(timeout=60)
        assert worker.returncode == 0, errors.decode()
    names = sorted(v.name for v in VoiceLibrary(tmp_path).list())
    assert names == ["Shared"] + [f"process voice {i}" for i in range(8)]


def test_opening_retries_wal_while_another_process_holds_the_new_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite can refuse `PRAGMA journal_mode=WAL` at once ("database is locked", no busy handler) while
    another process opens the same new library; the open waits it out instead of failing (it failed
    once in the suite: the two-process test above)."""
    import tts_service.voice_library as module

    real_connect, refusals = sqlite3.connect, []

    class Refusing:  # a connection whose first two WAL pragmas are refused, as in the race
        def __init__(self, *args: object, **kwargs: object) -> None:
            self._db = real_connect(*args, **kwargs)

        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
            if sql == "PRAGMA journal_mode=WAL" and len(refusals) < 2:
                refusals.append(sql)
                raise sqlite3.OperationalError("database is locked")
            return self._db.execute(sql, *args)

        def __getattr__(self, name: str) -> object:
            return getattr(self._db, name)

    monkeypatch.setattr(module.sqlite3, "connect", Refusing)
    library = VoiceLibrary(tmp_path)
    assert len(refusals) == 2
    assert library._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert library.create("After", "clone", "", "auto", FILES).name == "After"


def test_delete_removes_the_row_and_the_files(tmp_path: Path) -> None:
    library = VoiceLibrary(tmp_path)
    keep = library.create("Keep", "clone", "", "auto", FILES)
    gone = library.create("Gone", "clone", "", "auto", FILES)
    assert library.delete("GONE") == gone
    assert library.list() == [keep]
    assert not (tmp_path / "voices" / gone.id).exists()
    with pytest.raises(UnknownVoice):
        library.delete(gone.id)
    with pytest.raises(UnknownVoice):
        library.get("Gone")


def test_a_write_interrupted_before_its_commit_never_appears(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    library = VoiceLibrary(tmp_path)
    kept = library.create("Kept", "clone", "", "auto", FILES)

    def crash(voice: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")  # as if the insert failed after the rename

    monkeypatch.setattr(library, "_insert", crash)
    with pytest.raises(VoiceStoreError):
        library.create("Half", "clone", "", "auto", FILES)
    assert library.list() == [kept]
    assert sorted(p.name for p in (tmp_path / "voices").iterdir()) == [kept.id]

    # A crash of the whole process leaves folders behind: the next open removes them, and only them.
    (tmp_path / "voices" / "voice_deadbeefdeadbeef").mkdir()
    (tmp_path / "voices" / "voice_deadbeefdeadbeef" / "prompt.safetensors").write_bytes(b"half")
    (tmp_path / "tmp" / "voice_0123456789abcdef").mkdir()
    reopened = VoiceLibrary(tmp_path)
    assert reopened.list() == [kept]
    assert sorted(p.name for p in (tmp_path / "voices").iterdir()) == [kept.id]
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("name", ["", "   ", "x" * 65, "../../etc/passwd", "a\\b", "bell\x07"])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="name must be"):
        VoiceLibrary(tmp_path).create(name, "clone", "", "auto", FILES)


@pytest.mark.parametrize(
    "file_name", ["../prompt.safetensors", "/etc/passwd", "prompt.exe", "Prompt.pt", ".safetensors"]
)
def test_file_names_come_from_the_library_only(tmp_path: Path, file_name: str) -> None:
    with pytest.raises(ValueError, match="file name"):
        VoiceLibrary(tmp_path).create("Fine", "clone", "", "auto", {file_name: b"x"})
    assert not list(tmp_path.rglob("passwd"))


def test_a_library_that_cannot_be_opened_or_written_says_so_and_keeps_its_voices(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(VoiceStoreError, match="TTS_VOICES_DIR"):
        VoiceLibrary(blocker)

    library = VoiceLibrary(tmp_path / "lib")
    kept = library.create("Kept", "clone", "", "auto", FILES)
    staging = tmp_path / "lib" / "tmp"
    staging.rmdir()
    staging.write_text("the disk refuses new folders here")  # refuses root too, unlike file modes
    try:
        with pytest.raises(VoiceStoreError, match="cannot write"):
            library.create("New", "clone", "", "auto", FILES)
    finally:
        staging.unlink()
        staging.mkdir()
    assert library.list() == [kept]
    assert library.file(kept, "prompt.safetensors").read_bytes() == FILES["prompt.safetensors"]
