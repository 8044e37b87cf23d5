"""Build a tiny random-weight Qwen3-TTS CustomVoice checkpoint, offline, in seconds.

No weights can be downloaded in CI, yet the real qwen-tts loading and generation code must run in
tests. This writes a checkpoint with the real directory layout (config.json with the 9 released
speakers and 10 languages, generation_config.json, a Qwen2 BPE text tokenizer, model.safetensors and a
`speech_tokenizer/` folder) using qwen-tts's own config and model classes, so that
`Qwen3TTSModel.from_pretrained(path)` loads it like the real one. It speaks noise, but noise that
depends on the text, is clearly audible and ends at an end-of-speech token after a text-dependent
number of frames.

Run `python -m tts_service.dev.tiny_checkpoint OUT_DIR` to build one by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tts_service.codec import FRAME_RATE_HZ
from tts_service.voices import LANGUAGE_IDS, SPEAKERS

logger = logging.getLogger(__name__)

# Bump when the checkpoint's content changes, so cached copies are rebuilt.
TINY_FORMAT_VERSION = 2  # 2: the speech tokenizer's weights depend on the seed and arch, not the kind

# Codec control ids of the released 12 Hz models (the talker masks the top 1024 ids except EOS).
CODEC_PAD, CODEC_BOS, CODEC_EOS = 2148, 2149, 2150
CODEC_THINK, CODEC_NOTHINK, CODEC_THINK_BOS, CODEC_THINK_EOS = 2154, 2155, 2156, 2157
CODEC_VOCAB = 3072
CODEBOOK_SIZE = 2048
NUM_CODE_GROUPS = 16

# Text special tokens. The real model has them at 151643+; only the config's ids must match.
TEXT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>")

# The prompt is sliced at fixed offsets ("<|im_start|>", "assistant", "\n" | text | 5 tokens), so
# "assistant" must be one token: these merges build it from bytes.
_ASSISTANT_MERGES = ("a s", "as s", "ass i", "assi s", "assis t", "assist a", "assista n", "assistan t")


@dataclass(frozen=True)
class ArchSpec:
    """Sizes of the networks; the tiny defaults keep a CPU forward pass in milliseconds."""

    talker_layers: int = 2
    talker_hidden: int = 64
    talker_intermediate: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    predictor_layers: int = 1
    predictor_hidden: int = 64
    predictor_intermediate: int = 128
    decoder_hidden: int = 32
    decoder_layers: int = 1
    decoder_latent: int = 32
    decoder_dim: int = 64
    decoder_heads: int = 2
    codebook_dim: int = 32
    text_hidden: int | None = None  # None: the talker's hidden size
    text_vocab: int | None = None  # None: just the tiny tokenizer's ids
    model_size: str = "1b7"  # qwen-tts drops `instruct` unless this differs from "0b6"
    # Greedy decoding picks EOS once its logit beats the best codec id; this gain on the EOS row of the
    # codec head makes that happen after a text-dependent 4 to 45 frames (measured on TINY).
    eos_gain: float = 2.0


TINY = ArchSpec()

# The released sizes, for benchmarks with random weights (docs/PERFORMANCE.md gives the sources):
# talker 28 layers, 16 query / 8 KV heads of 128, text embeddings 151936 x 2048; code predictor
# 5 layers, hidden 1024; speech tokenizer decoder as qwen-tts's Qwen3TTSTokenizerV2DecoderConfig
# defaults (8 layers, hidden 1024, latent 1024, decoder_dim 1536, 16 heads).
_REAL_SHARED = dict(
    talker_layers=28,
    heads=16,
    kv_heads=8,
    head_dim=128,
    predictor_layers=5,
    predictor_hidden=1024,
    predictor_intermediate=3072,
    decoder_hidden=1024,
    decoder_layers=8,
    decoder_latent=1024,
    decoder_dim=1536,
    decoder_heads=16,
    codebook_dim=512,
    text_hidden=2048,
    text_vocab=151936,
    eos_gain=1.0,
)
ARCH_0_6B = ArchSpec(talker_hidden=1024, talker_intermediate=3072, model_size="0b6", **_REAL_SHARED)
ARCH_1_7B = ArchSpec(talker_hidden=2048, talker_intermediate=6144, model_size="1b7", **_REAL_SHARED)
# The released layer counts (28 talker, 5 code-predictor, 8 decoder layers) at tiny widths: the op and
# launch counts of the real models, at a CPU-friendly cost.
DEEP = ArchSpec(talker_layers=28, predictor_layers=5, decoder_layers=8)
ARCHS: dict[str, ArchSpec] = {"tiny": TINY, "deep": DEEP, "0.6b": ARCH_0_6B, "1.7b": ARCH_1_7B}


def _build_text_tokenizer(out_dir: Path) -> dict[str, int]:
    """Write a byte-level Qwen2 BPE tokenizer; returns the ids of its special tokens."""
    from transformers import Qwen2Tokenizer
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {sym: i for i, sym in enumerate(symbols)}
    for merge in _ASSISTANT_MERGES:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(_ASSISTANT_MERGES) + "\n", encoding="utf-8")
        tokenizer = Qwen2Tokenizer(
            str(vocab_file),
            str(merges_file),
            unk_token=None,
            bos_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            model_max_length=32768,
        )
        tokenizer.add_special_tokens({"additional_special_tokens": list(TEXT_SPECIAL_TOKENS[1:])})
        tokenizer.save_pretrained(out_dir)
    assert tokenizer.tokenize("assistant\n") == ["assistant", "Ċ"], "prompt slicing needs one-token 'assistant'"
    return {tok: tokenizer.convert_tokens_to_ids(tok) for tok in TEXT_SPECIAL_TOKENS}


# qwen-tts's tts_model_type of the CustomVoice, VoiceDesign and Base (voice cloning) models.
KINDS = ("custom_voice", "voice_design", "base")


def _talker_config(arch: ArchSpec, text_vocab: int, kind: str = "custom_voice") -> dict:
    half = arch.head_dim // 2
    mrope = [half - 2 * (half // 4), half // 4, half // 4]  # sums to head_dim/2, like [24, 20, 20]
    return {
        "vocab_size": CODEC_VOCAB,
        "hidden_size": arch.talker_hidden,
        "intermediate_size": arch.talker_intermediate,
        "num_hidden_layers": arch.talker_layers,
        "num_attention_heads": arch.heads,
        "num_key_value_heads": arch.kv_heads,
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000,
        "rope_scaling": {"rope_type": "default", "mrope_section": mrope, "interleaved": True},
        "num_code_groups": NUM_CODE_GROUPS,
        "text_hidden_size": arch.text_hidden or arch.talker_hidden,
        "text_vocab_size": max(text_vocab, arch.text_vocab or 0),
        "codec_eos_token_id": CODEC_EOS,
        "codec_think_id": CODEC_THINK,
        "codec_nothink_id": CODEC_NOTHINK,
        "codec_think_bos_id": CODEC_THINK_BOS,
        "codec_think_eos_id": CODEC_THINK_EOS,
        "codec_pad_id": CODEC_PAD,
        "codec_bos_id": CODEC_BOS,
        "codec_language_id": dict(LANGUAGE_IDS),
        # Only CustomVoice models have built-in speakers: VoiceDesign describes the voice, Base clones one.
        "spk_id": {s.name.lower(): s.codec_id for s in SPEAKERS} if kind == "custom_voice" else {},
        "spk_is_dialect": {s.name.lower(): (s.dialect or False) for s in SPEAKERS} if kind == "custom_voice" else {},
        "code_predictor_config": {
            "vocab_size": CODEBOOK_SIZE,
            "hidden_size": arch.predictor_hidden,
            "intermediate_size": arch.predictor_intermediate,
            "num_hidden_layers": arch.predictor_layers,
            "num_attention_heads": arch.heads,
            "num_key_value_heads": arch.kv_heads,
            "head_dim": arch.head_dim,
            "num_code_groups": NUM_CODE_GROUPS,
            "rope_theta": 1000000,
            "max_position_embeddings": 65536,
        },
    }


def _speech_tokenizer_config(arch: ArchSpec) -> dict:
    return {
        "encoder_valid_num_quantizers": NUM_CODE_GROUPS,
        "input_sample_rate": 24000,
        "output_sample_rate": 24000,
        "decode_upsample_rate": 1920,
        "encode_downsample_rate": 1920,
        # The Mimi encoder is only used for voice cloning; keep it minimal.
        "encoder_config": {
            "hidden_size": 16,
            "num_filters": 4,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "intermediate_size": 32,
            "codebook_size": CODEBOOK_SIZE,
            "codebook_dim": 16,
            "vector_quantization_hidden_dimension": 16,
            "num_quantizers": 32,
            "upsample_groups": 16,
            "frame_rate": FRAME_RATE_HZ,
        },
        "decoder_config": {
            "codebook_size": CODEBOOK_SIZE,
            "codebook_dim": arch.codebook_dim,
            "hidden_size": arch.decoder_hidden,
            "latent_dim": arch.decoder_latent,
            "num_attention_heads": arch.decoder_heads,
            "num_key_value_heads": arch.decoder_heads,
            "head_dim": arch.decoder_hidden // arch.decoder_heads,
            "intermediate_size": 2 * arch.decoder_hidden,
            "num_hidden_layers": arch.decoder_layers,
            "num_quantizers": NUM_CODE_GROUPS,
            "decoder_dim": arch.decoder_dim,
            "upsample_rates": [8, 5, 4, 3],
            "upsampling_ratios": [2, 2],
            "sliding_window": 72,
        },
    }


def _variance_preserving_init(module, generator) -> None:
    """Default init (std 0.02) yields near-silence and text-independent codes; rescale to unit gain."""
    import torch
    from torch import nn

    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv1d, nn.ConvTranspose1d)):
            w = sub.weight
            fan_in = w.shape[1] * math.prod(w.shape[2:]) if isinstance(sub, (nn.Linear, nn.Conv1d)) else w.shape[0]
            with torch.no_grad():
                w.copy_(torch.randn(w.shape, generator=generator) / math.sqrt(fan_in))
                if sub.bias is not None:
                    sub.bias.zero_()
        elif isinstance(sub, nn.Embedding):
            with torch.no_grad():
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator))


def _build_speech_tokenizer(arch: ArchSpec, out_dir: Path, generator) -> None:
    import torch
    from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Config
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import (
        EuclideanCodebook,
        Qwen3TTSTokenizerV2Model,
    )
    from transformers import EncodecFeatureExtractor

    config = Qwen3TTSTokenizerV2Config(**_speech_tokenizer_config(arch))
    model = Qwen3TTSTokenizerV2Model(config).eval()
    decoder = model.decoder
    _variance_preserving_init(decoder, generator)
    with torch.no_grad():
        for sub in decoder.modules():
            if isinstance(sub, EuclideanCodebook):  # zero codebooks decode to silence
                sub.embedding_sum.copy_(torch.randn(sub.embedding_sum.shape, generator=generator))
                sub.cluster_usage.fill_(1.0)
        # Calibrate the output layer on its pre-clamp output so random codes give audible, unclipped,
        # zero-mean noise (RMS about 0.1); SnakeBeta activations add a large DC offset before it.
        last = decoder.decoder[-1].conv
        captured = []
        hook = last.register_forward_hook(lambda _m, _i, out: captured.append(out))
        decoder(torch.randint(0, CODEBOOK_SIZE, (2, NUM_CODE_GROUPS, 25), generator=generator))
        hook.remove()
        mean, std = captured[0].mean().item(), captured[0].std().item()
        scale = 0.1 / max(std, 1e-6)
        last.weight.mul_(scale)
        last.bias.copy_((last.bias - mean) * scale)
    model.save_pretrained(out_dir, safe_serialization=True)
    EncodecFeatureExtractor(feature_size=1, sampling_rate=24000, padding_value=0.0).save_pretrained(out_dir)


def _speaker_encoder_config(arch: ArchSpec) -> dict:
    """The Base model's ECAPA-TDNN speaker encoder: its output is the talker's speaker embedding, so
    enc_dim is the talker's width; the tiny model shrinks its channels too (the real ones are qwen-tts's
    defaults)."""
    if arch.talker_hidden > TINY.talker_hidden:
        return {"enc_dim": arch.talker_hidden}
    return {
        "enc_dim": arch.talker_hidden,
        "enc_channels": [32, 32, 32, 32, 96],
        "enc_attention_channels": 16,
        "enc_res2net_scale": 4,
        "enc_se_channels": 16,
    }


def _build_talker(arch: ArchSpec, special: dict[str, int], generator, kind: str = "custom_voice"):
    import torch
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration

    config = Qwen3TTSConfig(
        talker_config=_talker_config(arch, max(special.values()) + 1, kind),
        speaker_encoder_config=_speaker_encoder_config(arch),
        tokenizer_type="qwen3_tts_tokenizer_12hz",
        tts_model_size=arch.model_size,
        tts_model_type=kind,
        im_start_token_id=special["<|im_start|>"],
        im_end_token_id=special["<|im_end|>"],
        tts_pad_token_id=special["<tts_pad>"],
        tts_bos_token_id=special["<tts_text_bos>"],
        tts_eos_token_id=special["<tts_text_eod>"],
    )
    config.architectures = ["Qwen3TTSForConditionalGeneration"]
    model = Qwen3TTSForConditionalGeneration(config).eval()
    _variance_preserving_init(model.talker, generator)
    if model.speaker_encoder is not None:  # so that different voices give clearly different embeddings
        _variance_preserving_init(model.speaker_encoder, generator)
    with torch.no_grad():
        head = model.talker.codec_head.weight
        head[CODEC_EOS].mul_(arch.eos_gain)
    return model


def build_tiny_checkpoint(
    out_dir: Path | str, *, arch: ArchSpec = TINY, seed: int = 0, kind: str = "custom_voice"
) -> Path:
    """Write a complete checkpoint into `out_dir` (created; must not hold another checkpoint)."""
    import torch

    from tts_service.engine import import_qwen_tts

    import_qwen_tts()  # quietly, before any of its submodules

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special_ids = _build_text_tokenizer(out)
    model = _build_talker(arch, special_ids, torch.Generator().manual_seed(seed), kind)
    if arch.talker_hidden > TINY.talker_hidden:  # bf16 on disk, as released: halves the real-size checkpoints
        model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    # One tokenizer for every kind, as the released models ship one (and a service's models then share
    # one decoder process).
    _build_speech_tokenizer(arch, out / "speech_tokenizer", torch.Generator().manual_seed(seed))

    # save_pretrained writes an empty model_type for the speaker encoder's config, which then fails to reload.
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config.get("speaker_encoder_config", {}).pop("model_type", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")

    # qwen-tts reads its sampling defaults from generation_config.json (upstream values).
    generation = {
        "do_sample": True,
        "top_k": 50,
        "top_p": 1.0,
        "temperature": 0.9,
        "repetition_penalty": 1.05,
        "subtalker_dosample": True,
        "subtalker_top_k": 50,
        "subtalker_top_p": 1.0,
        "subtalker_temperature": 0.9,
        "max_new_tokens": 2048,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    (out / "tiny_checkpoint.json").write_text(
        json.dumps({"format_version": TINY_FORMAT_VERSION, "seed": seed, "arch": arch.__dict__}, indent=2),
        encoding="utf-8",
    )
    logger.info("built tiny Qwen3-TTS checkpoint in %s", out)
    return out


def ensure_tiny_checkpoint(cache_dir: Path | str, arch: str = "tiny", kind: str = "custom_voice") -> Path:
    """Return a cached checkpoint of `arch` (ARCHS) and `kind` (KINDS) under `cache_dir`, built once (atomically)."""
    name = "tiny" if arch == "tiny" else f"random-{arch}"
    if kind != "custom_voice":
        name += "-" + kind.replace("_", "-")
    target = Path(cache_dir) / f"{name}-v{TINY_FORMAT_VERSION}"
    if (target / "tiny_checkpoint.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        build_tiny_checkpoint(staging, arch=ARCHS[arch], kind=kind)
        try:
            staging.rename(target)
        except OSError:  # another process won the race; use its copy
            if not (target / "tiny_checkpoint.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="tiny", help="network sizes (default tiny)")
    parser.add_argument("--kind", choices=KINDS, default="custom_voice", help="model kind (default custom_voice)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build_tiny_checkpoint(args.out_dir, arch=ARCHS[args.arch], seed=args.seed, kind=args.kind)


if __name__ == "__main__":
    main()
