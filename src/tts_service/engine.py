"""Load a Qwen3-TTS model once (CustomVoice, VoiceDesign or Base); every request then runs through its step engine.

No BentoML here: the service wraps this, and tests drive it directly.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tts_service import frame_step as fs
from tts_service.codec import FRAME_RATE_HZ
from tts_service.model_source import MODEL_SETTINGS, ModelLoadError, resolve_model_source
from tts_service.request_handle import Job, RequestHandle
from tts_service.scheduler import StepScheduler
from tts_service.schemas import ModelInfo, SpeakerInfo
from tts_service.segmenting import split_text
from tts_service.settings import Settings
from tts_service.stream_plan import ChunkPlan
from tts_service.verdict_store import FILE_NAME as VERDICTS_FILE
from tts_service.verdict_store import VerdictStore
from tts_service.voice_prompt import VoicePrompt, extract_voice_prompt
from tts_service.voices import SPEAKERS_BY_KEY

logger = logging.getLogger(__name__)


def import_qwen_tts() -> Any:
    """qwen-tts, imported without the banners its 25 Hz tokenizer prints on import ("flash-attn is not
    installed", "SoX could not be found" and the shell's "sox: not found"): the 12 Hz models served here
    use neither, so neither needs installing."""
    import contextlib
    import io
    import os
    import shutil
    import sys

    if "qwen_tts" in sys.modules:
        return sys.modules["qwen_tts"]
    real_popen, sox_logger = os.popen, logging.getLogger("sox")
    quiet = logging.Filter("nothing")  # passes no record of the "sox" logger (it resets its own level on import)

    def popen(command: str, *args: Any, **kwargs: Any) -> Any:  # the sox package probes `sox -h` through a shell
        if command == "sox -h" and shutil.which("sox") is None:
            return io.StringIO()
        return real_popen(command, *args, **kwargs)

    sox_logger.addFilter(quiet)
    os.popen = popen
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            import qwen_tts
    finally:
        os.popen = real_popen
        sox_logger.removeFilter(quiet)
    if printed.getvalue().strip():
        logger.debug("qwen-tts printed on import: %s", printed.getvalue().strip())
    return qwen_tts


# qwen-tts's tts_model_type of each checkpoint kind served, and what each is called in settings and docs.
MODEL_KINDS = {"custom_voice": "CustomVoice", "voice_design": "VoiceDesign", "base": "Base"}


def _out_of_memory(exc: BaseException | None) -> bool:
    """torch's out-of-memory error, or a CUDA library's (Triton's, a graph's) in a RuntimeError, or one
    whose cause is either."""
    import torch

    for _ in range(8):  # (the chain of causes, not a cycle)
        if exc is None:
            return False
        if isinstance(exc, torch.OutOfMemoryError) or (
            isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def out_of_memory_error(
    settings: Settings, setting: str, doing: str, kv_bytes: int | None, exc: BaseException
) -> ModelLoadError:
    """What to change when a model does not fit: a KV slot's size and count, and the other models loaded."""
    import torch

    where = "memory"
    if torch.cuda.is_available():
        try:
            free, total = torch.cuda.mem_get_info()
            where = f"GPU memory ({free / 1e9:.1f} of {total / 1e9:.1f} GB free now)"
        except Exception:  # (a CUDA context an error left unusable: the message goes out all the same)
            where = "GPU memory"
    slots, positions = settings.max_batch_size, settings.max_new_tokens + settings.max_prompt_tokens
    cache = ""
    if kv_bytes is not None:
        cache = f"its KV cache takes {slots} slots of {kv_bytes / 1e6:,.0f} MB ({slots * kv_bytes / 1e9:.1f} GB); "
    others = [name for name, spec in settings.model_specs().items() if spec and name != setting]
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ModelLoadError(
        f"{setting} ran out of {where} while {doing}: {cache}lower TTS_MAX_BATCH_SIZE (KV slots, now {slots}) or "
        f"TTS_MAX_NEW_TOKENS + TTS_MAX_PROMPT_TOKENS (positions per slot, now {positions})"
        + (f", or load fewer models ({' and '.join(others)} also set)" if others else "")
        + f". ({type(exc).__name__}: {first})"
    )


class UnknownVoiceError(ValueError):
    """A speaker or language the loaded model does not have."""

    def __init__(self, field: str, value: str, allowed: Sequence[str]) -> None:
        self.field, self.value, self.allowed = field, value, list(allowed)
        super().__init__(f"unknown {field} {value!r}; allowed: {', '.join(self.allowed)}")


@dataclass(frozen=True)
class SynthesisRequest:
    """One validated request; speaker and language are the model's own (lower-case) keys."""

    text: str
    speaker: str
    language: str = "auto"
    instruct: str = ""
    seed: int | None = None  # None: a fresh random seed (greedy decoding ignores it)
    voice: VoicePrompt | None = field(default=None, compare=False)  # a Base model's cloned voice


@dataclass(frozen=True)
class SynthesisResult:
    """A whole request's audio, collected from its stream."""

    audio: np.ndarray  # float32 mono
    sample_rate: int
    frames: int
    truncated: bool  # some segment stopped at its frame budget rather than at end of speech
    batch_size: int  # the largest step batch it shared
    segments: int = 1

    @property
    def num_samples(self) -> int:
        return len(self.audio)

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.sample_rate

    @property
    def wav(self) -> bytes:
        from tts_service.audio import encode_wav  # FFmpeg bindings: only where files are encoded

        return encode_wav(self.audio, self.sample_rate)


class SynthesisError(RuntimeError):
    """Generation failed for this request (not the client's fault)."""


def _is_logographic(char: str) -> bool:
    name = unicodedata.name(char, "")
    return name.startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL"))


def frame_budget(text: str, ceiling: int) -> int:
    """Most codec frames a text may take, so a missed end-of-speech token cannot run to the ceiling.

    Allows 2 s plus 2.5x a slow reading (4 CJK/kana/hangul or 12 other characters per second).
    """
    logographic = sum(1 for ch in text if _is_logographic(ch))
    seconds = 2.0 + 2.5 * (logographic / 4.0 + (len(text) - logographic) / 12.0)
    return max(1, min(ceiling, math.ceil(seconds * FRAME_RATE_HZ)))


def estimated_frames(text: str) -> int:
    """`frame_budget` without a ceiling: whether a text fits one generation."""
    return frame_budget(text, 1 << 30)


def _torch_options(settings: Settings) -> dict[str, Any]:
    import torch

    device = settings.device
    if device == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        device = "cuda:0"
    on_cuda = device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        raise ModelLoadError(f"TTS_DEVICE={settings.device} but no CUDA device is visible to torch.")
    if on_cuda and settings.decoder_worker == "process":
        raise ModelLoadError("TTS_DECODER_WORKER=process decodes on the CPU only; on a GPU use 'thread' or 'auto'.")

    dtype_name = settings.dtype if settings.dtype != "auto" else ("bfloat16" if on_cuda else "float32")
    attn = settings.attn_implementation
    if attn == "auto":
        attn = "sdpa"
        if on_cuda:
            try:
                import flash_attn  # noqa: F401

                attn = "flash_attention_2"
            except ImportError:
                pass
    return {"device_map": device, "dtype": getattr(torch, dtype_name), "attn_implementation": attn}


class TTSEngine:
    """The loaded model, its voice rules, and the step engine that every request goes through."""

    def __init__(self, model: Any, settings: Settings, model_id: str) -> None:
        self.model = model
        self.settings = settings
        self.model_id = model_id
        # "custom_voice": built-in speakers; "voice_design": no speakers, the instruction describes the
        # voice; "base": no speakers, every request brings a cloned voice (VoicePrompt).
        self.kind = str(model.model.tts_model_type)
        self._speaker_keys = sorted(model.get_supported_speakers() or [])
        self._language_keys = sorted(model.get_supported_languages() or ["auto"])
        if self.kind not in MODEL_KINDS:
            raise ModelLoadError(
                f"{model_id} is a {self.kind!r} model: only CustomVoice, VoiceDesign and Base models are served."
            )
        if self.kind == "custom_voice" and not self._speaker_keys:
            raise ModelLoadError(f"{model_id} has no built-in speakers: only CustomVoice models are served.")
        self.sample_rate = int(model.model.speech_tokenizer.get_output_sample_rate())
        self.samples_per_frame = int(model.model.speech_tokenizer.get_decode_upsample_rate())
        # Silences the "Setting pad_token_id" warning that transformers prints on every plain qwen-tts call.
        model.model.talker.generation_config.pad_token_id = model.model.config.talker_config.codec_pad_id
        self.scheduler = StepScheduler(
            model,
            slots=settings.max_batch_size,
            max_len=settings.max_new_tokens + settings.max_prompt_tokens,
            sampling=self.sampling_defaults(),
            cuda_graphs=settings.cuda_graphs,
            batch_invariant=settings.batch_invariant,
            compile_step=settings.compile_step,
            stateful_streams={"auto": None, "stateful": True, "window": False}[settings.stream_decoder],
            decoder_process={"auto": None, "process": True, "thread": False}[settings.decoder_worker],
            stream_plan=ChunkPlan(
                settings.stream_first_frames, settings.stream_chunk_frames, settings.stream_left_context
            ),
            quick_start=settings.stream_quick_start,
            fewer_kernels=settings.fewer_kernels,
            decode_attention=settings.decode_attention,
            verdicts=VerdictStore(settings.cache_dir / VERDICTS_FILE),
            kv_memory_bytes=None if settings.kv_memory_gb is None else int(settings.kv_memory_gb * 1e9),
        )

    @classmethod
    def load(cls, settings: Settings, setting: str = "TTS_MODEL") -> TTSEngine:
        """Load the checkpoint that `setting` (a key of MODEL_SETTINGS) names; it must be of a kind that
        setting accepts."""
        kinds = MODEL_SETTINGS[setting]
        spec = settings.model_specs()[setting]
        if not spec:
            raise ModelLoadError(f"{setting} is not set")
        source = resolve_model_source(spec, settings.cache_dir, setting)
        options = _torch_options(settings)
        Qwen3TTSModel = import_qwen_tts().Qwen3TTSModel
        wanted = " or ".join(MODEL_KINDS[kind] for kind in kinds)

        started = time.perf_counter()
        try:
            model = Qwen3TTSModel.from_pretrained(source, **options)
        except Exception as exc:
            if _out_of_memory(exc):
                raise out_of_memory_error(settings, setting, "loading its weights", None, exc) from exc
            raise ModelLoadError(
                f"Could not load a Qwen3-TTS checkpoint from {source} ({type(exc).__name__}: {exc}). "
                f"Check that the folder is a complete {wanted} checkpoint, or use {setting}=tiny."
            ) from exc
        kind = str(model.model.tts_model_type)
        if kind not in kinds:
            raise ModelLoadError(
                f"{setting}={spec!r} is a {MODEL_KINDS.get(kind, kind)} checkpoint; {setting} takes a {wanted} one"
                + ("" if kind != "base" else " (a Base checkpoint goes in TTS_CLONE_MODEL)")
            )
        try:
            engine = cls(model, settings, spec)
        except Exception as exc:
            if not _out_of_memory(exc):
                raise
            kv_bytes = fs.talker_kv_bytes(model, settings.max_new_tokens + settings.max_prompt_tokens)
            on_gpu = model.model.talker.codec_head.weight.device.type == "cuda"
            doing = "allocating its KV cache" + (" and capturing its CUDA graphs" if on_gpu else "")
            raise out_of_memory_error(settings, setting, doing, kv_bytes, exc) from exc
        logger.info(
            "loaded %s from %s on %s as %s (%s attention) in %.1f s; %d speakers, %d languages",
            spec,
            source,
            options["device_map"],
            str(options["dtype"]).removeprefix("torch."),
            options["attn_implementation"],
            time.perf_counter() - started,
            len(engine._speaker_keys),
            len(engine._language_keys),
        )
        return engine

    def sampling_defaults(self) -> dict[str, Any]:
        """qwen-tts's generation settings (generation_config.json), greedy when TTS_GREEDY is set."""
        merged = self.model._merge_generate_kwargs()
        if self.settings.greedy:
            merged.update(do_sample=False, subtalker_dosample=False)
        return merged

    @property
    def speakers(self) -> list[str]:
        """Display names (e.g. 'Uncle_Fu') of the loaded model's speakers."""
        return [SPEAKERS_BY_KEY[k].name if k in SPEAKERS_BY_KEY else k for k in self._speaker_keys]

    @property
    def languages(self) -> list[str]:
        return list(self._language_keys)

    @property
    def supports_instruct(self) -> bool:
        """qwen-tts's own test (the 0.6B models drop `instruct`); a cloned voice takes none."""
        return self.kind != "base" and self.model.model.tts_model_size not in "0b6"

    def describe(self) -> ModelInfo:
        """What clients need to build a request: voices (with descriptions where known) and languages."""
        speakers = []
        for key, name in zip(self._speaker_keys, self.speakers, strict=True):
            known = SPEAKERS_BY_KEY.get(key)
            speakers.append(
                SpeakerInfo(
                    name=name,
                    description=known.description if known else None,
                    native_language=known.native_language if known else None,
                )
            )
        return ModelInfo(
            model=self.model_id,
            speakers=speakers,
            languages=self.languages,
            sample_rate=self.sample_rate,
            supports_instruct=self.supports_instruct,
        )

    def clone_voice(self, audio: np.ndarray, sample_rate: int, transcript: str = "") -> VoicePrompt:
        """A reusable cloned voice from mono reference audio (Base models only); with a transcript, ICL mode."""
        if self.kind != "base":
            raise ModelLoadError(f"{self.model_id} is a {MODEL_KINDS[self.kind]} model: Base models clone voices")
        return extract_voice_prompt(self.model, audio, sample_rate, transcript)

    def resolve_speaker(self, name: str) -> str:
        key = name.strip().lower()
        if self.kind in ("voice_design", "base"):  # the voice comes from the instruction or the clone
            if key:
                raise UnknownVoiceError("speaker", name, [])
            return ""
        if key not in self._speaker_keys:
            raise UnknownVoiceError("speaker", name, self.speakers)
        return key

    def resolve_language(self, name: str | None) -> str:
        key = (name or "auto").strip().lower() or "auto"
        if key not in self._language_keys:
            raise UnknownVoiceError("language", name or "", self.languages)
        return key

    def request_for(
        self,
        text: str,
        speaker: str,
        language: str | None = None,
        instruct: str = "",
        seed: int | None = None,
        voice: VoicePrompt | None = None,
    ) -> SynthesisRequest:
        """Check a request against the loaded model: UnknownVoiceError names the field and the allowed
        values; ValueError means the text is empty or the voice does not suit the model."""
        text = text.strip()
        if not text:
            raise ValueError("text is empty")
        if (voice is not None) != (self.kind == "base"):
            raise ValueError("a Base model speaks cloned voices only, and only a Base model speaks them")
        return SynthesisRequest(
            text=text,
            speaker=self.resolve_speaker(speaker),
            language=self.resolve_language(language),
            instruct=instruct.strip(),
            seed=seed,
            voice=voice,
        )

    def frame_budget(self, text: str) -> int:
        return frame_budget(text, self.settings.max_new_tokens)

    def segments(self, text: str) -> list[str]:
        """The text cut where needed so that each piece fits one generation (see segmenting.py): at most
        TTS_SEGMENT_CHARS characters, and a frame budget that TTS_MAX_NEW_TOKENS does not cut short. (A
        ceiling below the budget of one short sentence is taken as a deliberate cap, not split for.)"""
        limit, ceiling = self.settings.segment_chars, self.settings.max_new_tokens
        by_budget = ceiling >= estimated_frames("x" * 24)

        def fits(piece: str) -> bool:
            return len(piece) <= limit and (not by_budget or estimated_frames(piece) <= ceiling)

        hard_cut = limit
        if by_budget:  # the most logographic characters whose budget still fits one generation
            hard_cut = min(limit, max(1, int((ceiling / FRAME_RATE_HZ - 2.0) / 2.5 * 4)))
        return split_text(text, fits, max_chars=hard_cut)

    def job(self, request: SynthesisRequest, stream: bool = True) -> Job:
        segments = tuple(self.segments(request.text))
        instruct = request.instruct if self.supports_instruct else ""
        return Job(
            segments=segments,
            speaker=request.speaker,
            language=request.language,
            instruct=instruct,
            seed=StepScheduler.new_seed() if request.seed is None else request.seed,
            plan=self.scheduler.stream_plan if stream else self.scheduler.file_plan,
            budgets=tuple(self.frame_budget(segment) for segment in segments),
            voice=request.voice,
        )

    def submit(
        self,
        request: SynthesisRequest,
        request_id: str,
        loop: asyncio.AbstractEventLoop | None = None,
        stream: bool = True,
    ) -> RequestHandle:
        """Start a request; its audio arrives as float32 chunks through the returned handle."""
        return self.scheduler.submit(self.job(request, stream), request_id, loop)

    def cancel(self, request_id: str) -> bool:
        return self.scheduler.cancel(request_id)

    def close(self, timeout_s: float = 10.0) -> bool:
        """Stop the engine's threads before the process exits (`StepScheduler.close`): its requests end
        with an error, later ones are refused. False if a thread outlived `timeout_s`."""
        return self.scheduler.close(timeout_s)

    def synthesize(self, request: SynthesisRequest, request_id: str | None = None) -> SynthesisResult:
        """A whole request, blocking: the same stream as every route, drained (tests, benchmarks)."""
        handle = self.submit(request, request_id or f"sync-{time.monotonic_ns()}", stream=False)
        audio = handle.collect()
        end = handle.end
        assert end is not None
        if end.error:
            raise SynthesisError(end.error)
        return SynthesisResult(
            audio=audio,
            sample_rate=self.sample_rate,
            frames=end.frames,
            truncated=end.truncated,
            batch_size=end.max_batch,
            segments=end.segments,
        )
