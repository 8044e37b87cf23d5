"""CI must run exactly the test command the README gives a new user."""

from __future__ import annotations

from tests.conftest import REPO_ROOT


def test_ci_runs_the_readme_test_command() -> None:
    ci_lines = [line for line in (REPO_ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    command = ci_lines[-1]
    assert "pytest" in command
    assert f"    {command}\n" in (REPO_ROOT / "README.md").read_text()
