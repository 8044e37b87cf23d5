"""All configuration, read once from `TTS_*` environment variables (documented in README)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL = "Qwen/Qwen3-TTS-12Hz-1.7B-CustomVoice"
# OpenAI's built-in voices, mapped by timbre (gender, brightness) onto the CustomVoice speakers (README).
DEFAULT_VOICE_MAP: dict[str, str] = {
    "alloy": "Vivian",
    "ash": "Ryan",
    "ballad": "Aiden",
    "coral": "Serena",
    "echo": "Aiden",
    "fable": "Ryan",
    "onyx": "Uncle_Fu",
    "nova": "Serena",
    "sage": "Sohee",
    "shimmer": "Ono_Anna",
    "verse": "Ryan",
    "marin": "Vivian",
    "cedar": "Uncle_Fu",
}
DEFAULT_MODEL_ALIASES: tuple[str, ...] = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TTS_", extra="ignore")

    model: str = Field(DEFAULT_MODEL, description="Hugging Face repo id, local checkpoint folder, or 'tiny'.")
    device: str = Field("auto", description="'auto' (cuda:0 when available, else cpu), 'cpu', 'cuda', 'cuda:N'.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    clone_model: str | None = Field(
        None, description="A Base checkpoint (repo id, folder or 'tiny') that clones voices; unset: no cloning."
    )
    design_model: str | None = Field(
        None, description="A VoiceDesign checkpoint (repo id, folder or 'tiny') that designs voices; unset: none."
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "tts_service",
        description="Where the tiny checkpoint is built and start-up checks keep their verdicts.",
    )
    voices_dir: Path = Field(
        Path.home() / ".local" / "share" / "tts_service" / "voices", description="The saved-voice library."
    )
    max_upload_bytes: int = Field(10_000_000, ge=1024, description="Larger reference-audio uploads get 413.")

    max_text_chars: int = Field(4096, ge=1, le=100_000)
    max_new_tokens: int = Field(2048, ge=2, description="Ceiling on codec frames per request (12.5 per second).")
    greedy: bool = Field(False, description="Greedy decoding (deterministic) instead of the model's sampling.")
    cuda_graphs: bool = Field(
        True, description="On a GPU, replay the frame step, a prompt's prefill and the stream decoder as CUDA graphs."
    )
    batch_invariant: bool | None = Field(
        None,
        description="A request gets the same bits whatever shares its steps, so a seed replays byte for byte in any "
        "company. Unset: on the CPU only, where it holds by construction (tested; the weights' layout and the "
        "decoder's batching are checked at start-up on that processor) and costs a lone request's step 1.0-1.7x "
        "(a step computes at least 2 or 4 rows, as measured at start-up; prompts are prefilled one by one). true "
        "on a GPU: products run at the full slot count, prompts are prefilled and windows decoded one by one (cost "
        "and effect not yet measured: "
        "scripts/check_seed_replay.py). false: faster alone, but a line's last bits, and rarely a code, may depend "
        "on its company.",
    )
    fewer_kernels: bool | None = Field(
        None,
        description="The frame step's forms with fewer kernels: fused RMSNorm, RoPE as addcmul, residuals added by "
        "their projection, the decode attention without GQA, a sampled frame's noise made at once; on a GPU where "
        "they pass a start-up check, Triton kernels for the q/k norm + RoPE + cache writes, SiLU-mul, top-k "
        "sampling and the decode attention (each row's live keys only). Unset: on a "
        "GPU in bfloat16 or float16, where each kernel is a launch; float32 and the CPU keep qwen-tts's own ops "
        "(on a CPU the forms are no faster). Not yet measured on a GPU.",
    )
    decode_attention: Literal["triton", "sdpa"] = Field(
        "triton",
        description="With the GPU's Triton kernels (TTS_FEWER_KERNELS), the talker's decode attention: triton, a "
        "kernel that reads each row's live keys, so one CUDA graph per batch size serves every length; sdpa, "
        "SDPA's call over a masked length bucket (six buckets at the defaults, so six times the step graphs). "
        "Not yet timed against each other on a GPU (scripts/gpu/issue15.sh quick times both).",
    )
    compile_step: bool = Field(
        False,
        description="Compile the frame step with Inductor at start-up (minutes; cached in TORCHINDUCTOR_CACHE_DIR); "
        "on a GPU the CUDA graphs then capture the compiled step.",
    )

    max_batch_size: int = Field(
        32, ge=1, le=256, description="Requests sharing each decode step (KV slots); more wait to join."
    )
    max_prompt_tokens: int = Field(1536, ge=64, description="KV room per slot for the prompt, beyond max_new_tokens.")
    kv_memory_gb: float | None = Field(
        None,
        gt=0,
        description="On the CPU, the most memory the KV cache may take (all engines of a worker together): a "
        "request claims its prompt and frame budget as it joins and waits while that would not fit. Unset: the "
        "memory available once the models are loaded (a container's cgroup limit included), less 10% or 1 GB.",
    )
    segment_chars: int = Field(
        400, ge=20, description="Longer texts are spoken as segments of at most this many characters."
    )
    request_timeout_s: int = Field(300, ge=1)
    max_concurrency: int = Field(64, ge=1, description="Requests in flight per worker beyond which 429 is answered.")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    cors_origins: Annotated[list[str], NoDecode] = ["*"]
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Comma-separated bearer keys; empty turns authentication off."
    )
    max_body_bytes: int = Field(262_144, ge=1024, description="Larger request bodies get 413.")
    max_queue: int = Field(32, ge=1, description="Requests waiting for synthesis per worker beyond which 429.")
    stream_first_frames: int = Field(4, ge=1, description="Codec frames (80 ms each) in a stream's first chunk.")
    stream_chunk_frames: int = Field(
        16, ge=1, description="Codec frames in each later chunk, reached by doubling (none longer than the audio sent)."
    )
    stream_quick_start: bool | None = Field(
        None,
        description="A stream that starts while every other stream has 0.5 s of audio in hand and steps run 3x "
        "faster than real time gets a first chunk of 1 frame (then 1, 2, 4, ...): first audio after one step "
        "instead of TTS_STREAM_FIRST_FRAMES. Unset: on where batch invariance is off (a GPU by default); never "
        "with batch invariance, where a stream's chunks must not depend on the load.",
    )
    stream_left_context: int = Field(25, ge=0, description="Frames of left context when decoding a chunk.")
    stream_decoder: Literal["auto", "stateful", "window"] = Field(
        "auto",
        description="How stream chunks are decoded: 'stateful' carries the decoder's state (audio equals a whole "
        "decode), 'window' re-decodes left context (batched, graph-captured); auto: stateful on the CPU.",
    )
    decoder_worker: Literal["auto", "thread", "process"] = Field(
        "auto",
        description="Where the speech decoder runs: 'process' (a child process, so decoding does not slow the "
        "engine loop through the GIL; CPU only) or 'thread'; auto: a process on the CPU, a thread on a GPU.",
    )

    openai_voice_map: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=lambda: dict(DEFAULT_VOICE_MAP),
        description="OpenAI voice name -> speaker, as JSON or 'alloy=Vivian,echo=Aiden'; replaces the default table.",
    )
    openai_model_aliases: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_MODEL_ALIASES),
        description="Model names /v1/audio/speech accepts besides the loaded model's id.",
    )

    @field_validator("openai_voice_map", mode="before")
    @classmethod
    def _parse_voice_map(cls, value: object) -> object:
        if isinstance(value, str):
            if value.strip().startswith("{"):
                return json.loads(value)
            pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
            if any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
                raise ValueError("expected JSON or comma-separated voice=Speaker pairs")
            return {alias.strip().lower(): speaker.strip() for alias, speaker in pairs}
        return value

    @field_validator("cors_origins", "openai_model_aliases", "api_keys", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    def model_specs(self) -> dict[str, str | None]:
        """Each model setting's name and value (None: not loaded)."""
        return {"TTS_MODEL": self.model, "TTS_CLONE_MODEL": self.clone_model, "TTS_DESIGN_MODEL": self.design_model}

    @field_validator("clone_model", "design_model", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
