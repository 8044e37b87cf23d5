"""CI must run exactly the test command the README gives a new user, and the README must list every setting."""

from __future__ import annotations

from tests.conftest import REPO_ROOT


def test_ci_runs_the_readme_test_command() -> None:
    ci_lines = [line for line in (REPO_ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    command = ci_lines[-1]
    assert "pytest" in command
    assert f"    {command}\n" in (REPO_ROOT / "README.md").read_text()


def test_the_readme_lists_every_setting() -> None:
    """Each field of the one settings object has a row, by its environment name, in the README's table."""
    from tts_service.settings import Settings

    prefix = Settings.model_config["env_prefix"]
    rows = [line.split("|")[1] for line in (REPO_ROOT / "README.md").read_text().splitlines() if line.startswith("| `")]
    missing = [name for name in Settings.model_fields if not any(f"`{prefix}{name.upper()}`" in row for row in rows)]
    assert not missing, missing
