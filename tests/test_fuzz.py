"""Schemathesis fuzzes every route of a live tiny-checkpoint server from its own /docs.json, with all three
models loaded, so the saved-voice routes design and clone voices from fuzzed input rather than answering
503 (no model)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT, LiveServer, running_server, studio_env

CONFIG = REPO_ROOT / "tests" / "fuzz" / "schemathesis.toml"
MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzzed(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """All three tiny models, their own voice library (the fuzzer fills it), texts capped at 300 characters."""
    env = studio_env(cache_dir, tmp_path_factory.mktemp("fuzzed-voices")) | {"TTS_MAX_TEXT_CHARS": "300"}
    with running_server(env, tmp_path_factory.mktemp("fuzzed") / "serve.log") as live:
        yield live


def test_schemathesis_finds_no_failures(fuzzed: LiveServer, tmp_path: Path) -> None:
    """All checks (no 5xx, response schemas, status codes, 405 for undeclared methods), bounded examples."""
    report = tmp_path / "report.ndjson"
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file",
        str(CONFIG),
        "run",
        f"{fuzzed.url}/docs.json",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "20261122",
        "--request-timeout",
        "60",
        "--report",
        "ndjson",
        "--report-ndjson-path",
        str(report),
    ]
    env = {**os.environ, "NO_COLOR": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    summary = result.stdout[-6000:]
    assert result.returncode == 0, summary
    # Every generated case passed. (A warning that most generated OpenAI bodies are refused is expected:
    # `model` and `voice` must name a served model and voice, which the schema cannot enumerate.)
    passed = re.search(r"(\d+) generated, (\d+) passed", summary)
    assert passed and passed[1] == passed[2], summary
    statuses: Counter[int] = Counter()
    by_operation: dict[str, Counter[int]] = {}
    tested: set[str] = set()
    for line in report.read_text().splitlines():
        event = json.loads(line)
        if "ScenarioFinished" not in event:
            continue
        recorder = event["ScenarioFinished"]["recorder"]
        interactions = recorder.get("interactions", {})  # none in a skipped scenario
        if interactions:
            tested.add(recorder["label"])
        for interaction in interactions.values():
            if interaction.get("response"):
                code = interaction["response"]["status_code"]
                statuses[code] += 1
                by_operation.setdefault(recorder["label"], Counter())[code] += 1
    print("schemathesis responses by status:", dict(sorted(statuses.items())))
    print("by operation:", {label: dict(sorted(codes.items())) for label, codes in sorted(by_operation.items())})
    assert sum(statuses.values()) >= 200, statuses
    assert not [code for code in statuses if code >= 500], statuses
    assert statuses[200] and statuses[400] and statuses[405], statuses  # it reached past validation, too
    # Fuzzed input designed or cloned a voice, not only bounced off validation or a missing model.
    assert by_operation["POST /v1/audio/voices"][201], by_operation["POST /v1/audio/voices"]
    assert not by_operation["POST /v1/audio/voices"][503], by_operation["POST /v1/audio/voices"]
    # Every documented operation was exercised, so a route cannot drop out of the fuzzing unnoticed.
    documented = {
        f"{method.upper()} {path}"
        for path, operations in httpx.get(f"{fuzzed.url}/docs.json").json()["paths"].items()
        for method in operations
    }
    assert len(documented) >= 11
    assert documented <= tested, documented - tested
