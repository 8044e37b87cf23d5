"""A bounded memory soak in CI (scripts/soak.py runs the 500-request version)."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.conftest import LiveServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from soak import soak  # noqa: E402


def test_resident_memory_does_not_creep(server: LiveServer) -> None:
    result = soak(server.url, server.process.pid, requests=100, warm_up=30)
    assert result["growth_pct"] < 5.0, result
