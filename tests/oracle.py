"""The correctness oracle: plain qwen-tts `generate_custom_voice` (for a VoiceDesign model
`generate_voice_design`, for a Base model `generate_voice_clone` with the request's clone prompt) for
one request, greedy, and the codec codes it handed to its speech decoder."""

from __future__ import annotations

import numpy as np
import torch

from tts_service.engine import SynthesisRequest, TTSEngine

_KNOWN: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def reference(engine: TTSEngine, request: SynthesisRequest, budget: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(codes [frames, 16], float32 audio) of qwen-tts generating this request alone, greedy, with at
    most `budget` frames (the engine's text budget by default). Kept per checkpoint, device and dtype (no
    test changes a loaded model's weights), so engines loaded from one checkpoint share it: on the CPU the
    real layer counts' take seconds each. A cloned voice's is not kept."""
    budget = engine.frame_budget(request.text) if budget is None else budget
    weight = engine.model.model.talker.codec_head.weight
    key = (engine.model_id, engine.kind, str(weight.device), weight.dtype, request, budget)
    if request.voice is None and key in _KNOWN:
        codes, audio = _KNOWN[key]
        return codes.copy(), audio.copy()
    codes, audio = _generate(engine, request, budget)
    if request.voice is None:
        _KNOWN[key] = codes.copy(), audio.copy()
    return codes, audio


def _generate(engine: TTSEngine, request: SynthesisRequest, budget: int) -> tuple[np.ndarray, np.ndarray]:
    tokenizer = engine.model.model.speech_tokenizer
    original = tokenizer.decode
    recorded: list[torch.Tensor] = []

    def recording_decode(encoded):  # the real decoder, with the codes noted on the way
        recorded.append(encoded[0]["audio_codes"].clone())
        return original(encoded)

    tokenizer.decode = recording_decode
    try:
        # max_new_tokens: the last token sampled never becomes a frame.
        options = {"do_sample": False, "subtalker_dosample": False, "max_new_tokens": budget + 1}
        if engine.kind == "base":
            voice = request.voice
            assert voice is not None
            from qwen_tts.inference.qwen3_tts_model import VoiceClonePromptItem

            item = VoiceClonePromptItem(
                ref_code=voice.ref_codes,
                ref_spk_embedding=voice.speaker_embedding,
                x_vector_only_mode=not voice.icl,
                icl_mode=voice.icl,
                ref_text=voice.ref_text or None,
            )
            wavs, _ = engine.model.generate_voice_clone(
                text=request.text,
                language=request.language,
                voice_clone_prompt=[item],
                non_streaming_mode=True,
                **options,
            )
        elif engine.kind == "voice_design":
            wavs, _ = engine.model.generate_voice_design(
                text=request.text, instruct=request.instruct, language=request.language, **options
            )
        else:
            wavs, _ = engine.model.generate_custom_voice(
                text=request.text,
                speaker=request.speaker,
                language=request.language,
                instruct=request.instruct,
                **options,
            )
    finally:
        tokenizer.decode = original
    codes = recorded[-1].cpu().numpy()
    if request.voice is not None and request.voice.icl:  # qwen-tts decodes the reference frames first
        codes = codes[len(request.voice.ref_codes) :]
    return codes, np.asarray(wavs[0], dtype=np.float32)


# Requests of different lengths (on the tiny checkpoint, greedy: 125, 8, 23, 5 and 2 frames), speakers,
# languages, with and without instruct; the last ends at the earliest frame qwen-tts allows.
ORACLE_REQUESTS = [
    SynthesisRequest(
        "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen.",
        "ryan",
        "english",
    ),
    SynthesisRequest("これは日本語のテキストです。", "vivian", "auto"),
    SynthesisRequest(
        "Please keep your hands inside the vehicle at all times and enjoy the ride through the ancient forest.",
        "vivian",
        "english",
        "Speak happily",
    ),
    SynthesisRequest("The museum opens at nine and closes at six every day except Monday.", "sohee", "korean"),
    SynthesisRequest("Hello there, Beijing.", "dylan", "chinese"),  # ends at the earliest allowed frame
]
