"""The saved-voice library on disk: metadata in SQLite, each voice's files in a folder named by its id.

Layout under TTS_VOICES_DIR:
    voices.sqlite3            one row per voice (WAL mode, so readers never wait for a writer)
    voices/<id>/<file>        a voice's files (clone prompt tensors, reference audio, preview)
    tmp/<pid>.<id>/           files being written by process <pid>

A voice appears only once its row is committed, and its row is committed only after its folder is in
place: the files are written (and fsynced) under tmp/, then, holding SQLite's write lock, the folder is
renamed into voices/ and the row inserted and committed. A crash between leaves a folder without a row,
which the next open removes (under the same lock, so never another process's voice in the making); a
half-written voice is never listed. Deleting commits the row's removal first, then removes the folder. Ids are
generated here and file names come from a fixed pattern, so nothing a client sends becomes a path.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

VoiceKind = Literal["clone", "design"]
MAX_NAME_CHARS = 64
FILE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}\.(safetensors|wav|json)$")
NAME = re.compile(r"^[^\x00-\x1f\x7f/\\]+$")  # printable, no path separators (names are shown, never paths)
SCHEMA = """
CREATE TABLE IF NOT EXISTS voices (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    name_key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('clone', 'design')),
    text TEXT NOT NULL,
    language TEXT NOT NULL,
    created REAL NOT NULL,
    files TEXT NOT NULL
)
"""


class VoiceStoreError(RuntimeError):
    """The library cannot be opened or written; the message says where and why."""


class DuplicateVoiceName(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"a voice named {name!r} already exists (names are case-insensitive)")
        self.name = name


class UnknownVoice(KeyError):
    def __init__(self, ref: str) -> None:
        super().__init__(ref)
        self.ref = ref

    def __str__(self) -> str:
        return f"no saved voice has the id or name {self.ref!r}"


@dataclass(frozen=True)
class StoredVoice:
    id: str
    name: str
    kind: VoiceKind
    text: str  # the transcript of a clone's reference audio, or a designed voice's description
    language: str
    created: float  # seconds since the epoch
    files: tuple[str, ...]


def name_key(name: str) -> str:
    return name.strip().casefold()


def check_name(name: str) -> str:
    """The name as stored: trimmed, 1 to 64 printable characters without path separators."""
    name = name.strip()
    if not 1 <= len(name) <= MAX_NAME_CHARS or not NAME.match(name):
        raise ValueError(f"name must be 1 to {MAX_NAME_CHARS} printable characters without '/' or '\\'")
    return name


def _enable_wal(db: sqlite3.Connection, timeout_s: float = 30.0) -> None:
    """`PRAGMA journal_mode=WAL`, retried while "database is locked": when processes open a new library
    at once, SQLite can refuse it at once without calling the busy handler (seen: 1 open in 60 failed
    with 6 processes starting together), so the connection's 30 s busy timeout is applied here by hand."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class VoiceLibrary:
    """Thread-safe within a process; processes sharing the folder are kept apart by SQLite and rename."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        try:
            for folder in (self.root, self.root / "voices", self.root / "tmp"):
                folder.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: every transaction below is an explicit BEGIN IMMEDIATE ... COMMIT.
            self._db = sqlite3.connect(
                self.root / "voices.sqlite3", check_same_thread=False, timeout=30, isolation_level=None
            )
            _enable_wal(self._db)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise VoiceStoreError(f"cannot open the voice library in {self.root} (TTS_VOICES_DIR): {exc}") from exc
        self._sweep()

    def close(self) -> None:
        self._db.close()

    def _sweep(self) -> None:
        """Remove what a crash left: folders under voices/ without a row, and staging folders of processes
        that are gone. Holds the write lock, so a voice being committed by another process is never seen
        half-way."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                ids = {row[0] for row in self._db.execute("SELECT id FROM voices")}
                for folder in (self.root / "voices").iterdir():
                    if folder.name not in ids:
                        logger.warning("removing %s: a voice folder without a committed voice", folder)
                        shutil.rmtree(folder, ignore_errors=True)
            finally:
                self._db.execute("COMMIT")
        for leftover in (self.root / "tmp").iterdir():
            pid = leftover.name.split(".", 1)[0]
            if not pid.isdigit() or not _alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)

    @staticmethod
    def _voice(row: tuple) -> StoredVoice:
        voice_id, name, kind, text, language, created, files = row
        return StoredVoice(voice_id, name, kind, text, language, created, tuple(json.loads(files)))

    def list(self) -> list[StoredVoice]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, name, kind, text, language, created, files FROM voices ORDER BY created, name_key"
            ).fetchall()
        return [self._voice(row) for row in rows]

    def get(self, ref: str) -> StoredVoice:
        """A voice by its id or its name (case-insensitive)."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, name, kind, text, language, created, files FROM voices WHERE id = ? OR name_key = ?",
                (ref.strip(), name_key(ref)),
            ).fetchone()
        if row is None:
            raise UnknownVoice(ref)
        return self._voice(row)

    def file(self, voice: StoredVoice, file_name: str) -> Path:
        if file_name not in voice.files:
            raise FileNotFoundError(f"voice {voice.id} has no {file_name}")
        return self.root / "voices" / voice.id / file_name

    def create(self, name: str, kind: VoiceKind, text: str, language: str, files: Mapping[str, bytes]) -> StoredVoice:
        """Store a voice with its files; DuplicateVoiceName if the name is taken (case-insensitively)."""
        name = check_name(name)
        for file_name in files:
            if not FILE_NAME.match(file_name):
                raise ValueError(f"file name {file_name!r} is not one of the library's own names")
        voice = StoredVoice(
            id="voice_" + secrets.token_hex(8),
            name=name,
            kind=kind,
            text=text,
            language=language,
            created=time.time(),
            files=tuple(sorted(files)),
        )
        staging, final = self.root / "tmp" / f"{os.getpid()}.{voice.id}", self.root / "voices" / voice.id
        try:
            staging.mkdir()
            for file_name, data in files.items():
                with open(staging / file_name, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise VoiceStoreError(f"cannot write voice files under {self.root}: {exc}") from exc
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")  # the write lock, across processes, until COMMIT
                try:
                    if self._db.execute("SELECT 1 FROM voices WHERE name_key = ?", (name_key(name),)).fetchone():
                        raise DuplicateVoiceName(name)
                    os.rename(staging, final)
                    self._insert(voice)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    shutil.rmtree(final, ignore_errors=True)
                    raise
            except sqlite3.IntegrityError:
                raise DuplicateVoiceName(name) from None
            except (OSError, sqlite3.Error) as exc:
                raise VoiceStoreError(f"cannot store voice {name!r} under {self.root}: {exc}") from exc
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        logger.info("saved voice %s (%s, %s)", voice.id, voice.name, voice.kind)
        return voice

    def _insert(self, voice: StoredVoice) -> None:
        self._db.execute(
            "INSERT INTO voices (id, name, name_key, kind, text, language, created, files) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                voice.id,
                voice.name,
                name_key(voice.name),
                voice.kind,
                voice.text,
                voice.language,
                voice.created,
                json.dumps(list(voice.files)),
            ),
        )

    def delete(self, ref: str) -> StoredVoice:
        """Remove a voice: its row first (it is gone from then on), then its folder."""
        voice = self.get(ref)
        with self._lock:
            try:
                deleted = self._db.execute("DELETE FROM voices WHERE id = ?", (voice.id,)).rowcount  # autocommits
            except sqlite3.Error as exc:
                raise VoiceStoreError(f"cannot delete voice {voice.id} under {self.root}: {exc}") from exc
        if deleted == 0:
            raise UnknownVoice(ref)  # deleted meanwhile
        shutil.rmtree(self.root / "voices" / voice.id, ignore_errors=True)
        logger.info("deleted voice %s (%s)", voice.id, voice.name)
        return voice


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
