"""Which checkpoints the model settings may name, checked before any worker starts, and where each one's
folder is. No torch here: the front service imports this through `startup.preflight`."""

from __future__ import annotations

from pathlib import Path


class ModelLoadError(RuntimeError):
    """The configured model cannot be loaded; the message says what to do."""


# The kinds of checkpoint each model setting accepts (the first is what `tiny` builds).
MODEL_SETTINGS = {
    "TTS_MODEL": ("custom_voice", "voice_design"),
    "TTS_CLONE_MODEL": ("base",),
    "TTS_DESIGN_MODEL": ("voice_design",),
}


def hub_error(spec: str, exc: Exception, setting: str) -> ModelLoadError:
    return ModelLoadError(
        f"Could not fetch {setting}={spec!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
        "Without network access, download it elsewhere (huggingface-cli download "
        f"{spec} --local-dir DIR), copy DIR here and set {setting}=DIR, or set {setting}=tiny for the "
        "offline test model."
    )


def check_model_source(spec: str, *, reach_hub: bool = True, setting: str = "TTS_MODEL") -> None:
    """Fail fast, before any worker starts, on the common mistakes: a wrong path, an unreachable hub."""
    spec = spec.strip()
    if spec.lower() == "tiny":
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{setting}={spec!r} has no config.json: it is not a Qwen3-TTS checkpoint folder.")
        return
    if spec.startswith(("/", ".", "~")) or path.exists() or spec.count("/") != 1:
        raise ModelLoadError(
            f"{setting}={spec!r} is neither a checkpoint folder nor a Hugging Face repo id (owner/name). "
            f"Point it at a folder holding config.json, or use {setting}=tiny for the offline test model."
        )
    if not reach_hub:
        return
    from huggingface_hub import HfApi, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(spec, "config.json"), str):
        return
    try:
        HfApi().model_info(spec, timeout=10)
    except Exception as exc:
        raise hub_error(spec, exc, setting) from exc


def resolve_model_source(spec: str, cache_dir: Path, setting: str = "TTS_MODEL") -> str:
    """Turn a model setting into a local checkpoint folder, building or downloading it if needed."""
    spec = spec.strip()
    if spec.lower() == "tiny":
        from tts_service.dev.tiny_checkpoint import ensure_tiny_checkpoint  # a dev and test model only

        return str(ensure_tiny_checkpoint(cache_dir, kind=MODEL_SETTINGS[setting][0]))
    check_model_source(spec, reach_hub=False, setting=setting)  # snapshot_download below reports hub trouble
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(spec)
    except Exception as exc:  # network, auth, unknown repo: all mean the same to the operator
        raise hub_error(spec, exc, setting) from exc
