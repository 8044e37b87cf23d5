"""The DGX Spark deployment as far as a machine without a Docker engine can check it: the Bento build,
the generated Dockerfile and requirements, the compose file (client-side `config`), and the
deployment script's stop on a missing engine."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from tests.conftest import REPO_ROOT

BENTOML = str(Path(sys.executable).with_name("bentoml"))


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    result = subprocess.run(
        [BENTOML, "build", "."], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tag = re.search(r'Successfully built Bento\(tag="([^"]+)"\)', result.stdout + result.stderr).group(1)
    name, version = tag.split(":")
    assert name == "qwen3-tts"
    return home / "bentos" / name / version


def test_image_recipe_targets_the_spark(bento: Path) -> None:
    dockerfile = (bento / "env/docker/Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    apt = next(line for line in dockerfile.splitlines() if "libsndfile1" in line)
    assert {"libsndfile1", "sox", "curl"} <= set(apt.split())
    assert {"g++", "libc6-dev"} <= set(apt.split())  # Inductor and Triton compile at start-up (TTS_COMPILE_STEP)
    assert "EXPOSE 8000" in dockerfile
    for env in (
        "TTS_MODEL=Qwen/Qwen3-TTS-12Hz-1.7B-CustomVoice",
        "TTS_PORT=8000",
        "HF_HOME=/data/hf-cache",
        "TTS_VOICES_DIR=/data/voices",
        "PYTHONPATH=/home/bentoml/bento/src/src",
        "TORCHINDUCTOR_CACHE_DIR=/data/tts-cache/inductor",  # compile caches on the cache volume
        "TRITON_CACHE_DIR=/data/tts-cache/triton",
        "CUDA_CACHE_PATH=/data/tts-cache/cuda",
    ):
        assert f"ARG {env}" in dockerfile
    assert "USER bentoml" in dockerfile
    setup = (bento / "env/docker/setup_script").read_text()
    assert "mkdir -p /data/hf-cache /data/tts-cache /data/voices" in setup and "chown -R bentoml:bentoml /data" in setup


def test_requirements_take_pypi_cuda13_torch_and_are_pinned_without_an_x86_lock(bento: Path) -> None:
    """PyPI's torch 2.11.0 is the CUDA 13 build for aarch64 and x86_64 alike (scripts/resolve_aarch64.py)."""
    requirements = (bento / "env/python/requirements.txt").read_text().split()
    assert "torch==2.11.0" in requirements and "torchaudio==2.11.0" in requirements
    assert "qwen-tts==0.1.1" in requirements and "bentoml==1.4.39" in requirements
    assert all("==" in line for line in requirements), requirements  # lock is off, so everything is pinned
    assert not (bento / "env/python/requirements.lock.txt").exists()  # BentoML would lock for x86_64
    assert "download.pytorch.org" not in (bento / "env/python/install.sh").read_text()  # PyPI alone


def test_bento_carries_the_service_and_package_but_not_tests(bento: Path) -> None:
    files = {p.relative_to(bento / "src").as_posix() for p in (bento / "src").rglob("*") if p.is_file()}
    package = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "src/tts_service").rglob("*.py")}
    assert {"service.py", *package} <= files
    assert not any(f.startswith(("tests/", "ui/")) or "__pycache__" in f for f in files)
    services = {s["name"]: s["config"] for s in yaml.safe_load((bento / "bento.yaml").read_text())["services"]}
    assert services["qwen3_tts"]["http"]["port"] == 8000 and services["qwen3_tts"]["http"]["host"] == "0.0.0.0"
    assert services["qwen3_tts_synthesizer"]["resources"] == {"gpu": 1}


def test_bentofile_pins_satisfy_pyproject() -> None:
    pins = {}
    for spec in yaml.safe_load((REPO_ROOT / "bentofile.yaml").read_text())["python"]["packages"]:
        requirement = Requirement(spec)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", spec
        pins[requirement.name] = specifier.version
    for spec in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(spec)
        if requirement.name == "bentoml":
            continue  # BentoML adds its own version to every Bento
        assert requirement.name in pins, f"{requirement.name} is not pinned in bentofile.yaml"
        assert requirement.specifier.contains(pins[requirement.name].split("+")[0]), (spec, pins[requirement.name])


@pytest.fixture(scope="module", params=["v1", "v2"])
def compose_command(request, tmp_path_factory) -> list[str]:
    """Compose v1 (Debian bookworm's docker-compose 1.29, which the README test command installs) and
    Compose v2 (the `docker compose` plugin the Spark runs: the engine's own, $TTS_COMPOSE_V2, or Debian
    trixie's package fetched by scripts/compose_v2.sh)."""
    if request.param == "v1":
        assert shutil.which("docker-compose"), "a Compose client is needed (the README test command installs it)"
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if os.environ.get("TTS_COMPOSE_V2"):
        return [os.environ["TTS_COMPOSE_V2"]]
    fetch = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts/compose_v2.sh"), str(tmp_path_factory.mktemp("compose-v2"))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if fetch.returncode != 0:
        pytest.skip(f"Compose v2 could not be fetched from Debian trixie: {fetch.stderr[-300:]}")
    return [fetch.stdout.strip()]


def compose_config(command: list[str], env: dict[str, str] | None = None) -> dict:
    version = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0, version.stderr
    environment = {k: v for k, v in os.environ.items() if k not in ("TTS_API_KEYS", "TTS_UI_API_KEY")}
    result = subprocess.run(
        [*command, "config"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**environment, **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_file_reserves_the_gpu_and_wires_the_ui(compose_command: list[str]) -> None:
    services = compose_config(compose_command)["services"]
    tts, ui = services["tts"], services["ui"]
    (device,) = tts["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert [(int(p["published"]), int(p["target"])) for p in tts["ports"]] == [(8000, 8000)]
    mounts = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in tts["volumes"]]
    assert any(m.startswith("hf-cache:/data/hf-cache") for m in mounts), mounts
    assert any(m.startswith("tts-cache:/data/tts-cache") for m in mounts), mounts
    assert tts["environment"]["TTS_CACHE_DIR"] == "/data/tts-cache"
    assert (
        any(m.startswith("voices:/data/voices") for m in mounts)
        and tts["environment"]["TTS_VOICES_DIR"] == "/data/voices"
    )
    assert "Base" in tts["environment"]["TTS_CLONE_MODEL"] and "VoiceDesign" in tts["environment"]["TTS_DESIGN_MODEL"]
    assert tts["environment"]["TTS_API_KEYS"] == "" and ui["environment"]["TTS_API_KEY"] == ""  # none by default
    assert ui["depends_on"]["tts"]["condition"] == "service_healthy"  # the UI starts once the model is up
    health = tts["healthcheck"]
    assert "http://localhost:8000/readyz" in health["test"]
    assert health["start_period"] in ("30m", "30m0s", 1800)  # time for the first weight download
    assert tts["restart"] == "unless-stopped"
    assert tts["environment"]["HF_HOME"] == "/data/hf-cache"
    assert [(int(p["published"]), int(p["target"])) for p in ui["ports"]] == [(8501, 8501)]
    assert ui["environment"]["TTS_API_URL"] == "http://tts:8000"  # the TTS service by its service name
    assert Path(ui["build"]["context"]).resolve() == REPO_ROOT / "ui"


def test_compose_passes_api_keys_through_and_gives_the_ui_its_key(compose_command: list[str]) -> None:
    services = compose_config(compose_command, {"TTS_API_KEYS": "k-quest,k-ui", "TTS_UI_API_KEY": "k-ui"})["services"]
    assert services["tts"]["environment"]["TTS_API_KEYS"] == "k-quest,k-ui"
    assert services["ui"]["environment"]["TTS_API_KEY"] == "k-ui"


def test_ui_image_installs_without_torch() -> None:
    dockerfile = (REPO_ROOT / "ui/Dockerfile").read_text()
    assert "pip install --no-cache-dir -r requirements.txt" in dockerfile and "EXPOSE 8501" in dockerfile
    assert '"--server.address", "0.0.0.0"' in dockerfile
    lines = (REPO_ROOT / "ui/requirements.txt").read_text().splitlines()
    names = {Requirement(line).name for line in lines if line.strip() and not line.startswith("#")}
    assert names == {"streamlit", "requests"}


def test_verify_script_stops_clearly_without_a_docker_engine(tmp_path: Path) -> None:
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts/verify_deployment.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "STOPPED: The Docker engine is not reachable" in output
    assert re.search(r"docker engine\s+FAIL", output) and re.search(r"compose file\s+PASS", output)
    assert "command not found" not in output and "Traceback" not in output and "unbound variable" not in output


def test_the_fat_binary_reader_finds_the_architectures_torch_was_built_for() -> None:
    """scripts/resolve_aarch64.py --archs reads the aarch64 wheel's kernels without a GPU; here the same
    reader runs on this venv's (x86_64, CUDA 13) libtorch_cuda.so against torch's own compiled-in list."""
    import torch

    from scripts.resolve_aarch64 import fatbin_archs

    library = Path(torch.__file__).parent / "lib" / "libtorch_cuda.so"
    if not library.exists():
        pytest.skip("a CPU-only torch has no libtorch_cuda.so")
    counts = fatbin_archs(library)
    built_for = {int(flag.removeprefix("sm_")) for flag in torch._C._cuda_getArchFlags().split()}
    common = {sm for (kind, sm), n in counts.items() if kind == "SASS" and n > 100}
    assert built_for and common == built_for, (built_for, counts)


def test_local_image_check_stops_clearly_without_buildah(tmp_path: Path) -> None:
    """scripts/verify_image_local.sh builds and runs the image with buildah (README); without it, one line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("id", "dirname", "date", "mkdir"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = subprocess.run(
        ["/bin/bash", str(REPO_ROOT / "scripts/verify_image_local.sh")],
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    expected = "needs buildah" if os.geteuid() == 0 else "run as root"
    assert expected in output and "command not found" not in output, output
