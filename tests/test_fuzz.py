"""Schemathesis fuzzes every route of a live tiny-checkpoint server from its own /docs.json."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx

from tests.conftest import REPO_ROOT, LiveServer

CONFIG = REPO_ROOT / "tests" / "fuzz" / "schemathesis.toml"
MAX_EXAMPLES = 25


def test_schemathesis_finds_no_failures(server: LiveServer, tmp_path: Path) -> None:
    """All checks (no 5xx, response schemas, status codes, 405 for undeclared methods), bounded examples."""
    report = tmp_path / "report.ndjson"
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file",
        str(CONFIG),
        "run",
        f"{server.url}/docs.json",
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
                statuses[interaction["response"]["status_code"]] += 1
    print("schemathesis responses by status:", dict(sorted(statuses.items())))
    assert sum(statuses.values()) >= 200, statuses
    assert not [code for code in statuses if code >= 500], statuses
    assert statuses[200] and statuses[400] and statuses[405], statuses  # it reached past validation, too
    # Every documented operation was exercised, so a route cannot drop out of the fuzzing unnoticed.
    documented = {
        f"{method.upper()} {path}"
        for path, operations in httpx.get(f"{server.url}/docs.json").json()["paths"].items()
        for method in operations
    }
    assert len(documented) >= 11
    assert documented <= tested, documented - tested
