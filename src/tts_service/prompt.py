"""A request's talker prompt, built exactly as qwen-tts 0.1.1 builds it for `generate_custom_voice`.

qwen-tts builds the prompt inside `Qwen3TTSForConditionalGeneration.generate` and hands it, left-padded
for the batch, straight to HF `generate`. The step engine needs each request's prompt alone (its own
slot, no padding), so this repeats that construction for one request, operation for operation, so the
embeddings are bitwise the same (the tests check the codes they lead to against qwen-tts's own generate). Every
kind is built in qwen-tts's non-streaming text mode (the default of `generate_custom_voice` and
`generate_voice_design`; `generate_voice_clone` offers it as `non_streaming_mode=True`): the whole text
is in the prompt, and every decode step adds the projected pad text embedding.
"""

from __future__ import annotations

import torch

from tts_service.frame_step import host_to_device
from tts_service.voice_prompt import VoicePrompt


class PromptBuilder:
    """Tokenize and embed requests with a loaded `qwen_tts.Qwen3TTSModel`'s own tokenizer and weights."""

    def __init__(self, wrapper) -> None:
        self.wrapper = wrapper
        self.model = wrapper.model
        self.talker = self.model.talker
        self.config = self.model.config
        self.honours_instruct = self.model.tts_model_size not in "0b6"  # qwen-tts's own test, verbatim
        self._special: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # Codec embeddings of fixed id lists (language tags, speakers, pad, bos): a lookup copies rows of the
        # table, so a cached one is bitwise the same, and no request sends these ids to the device again.
        self._codec_cache: dict[tuple, torch.Tensor] = {}

    def _text_embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.talker.text_projection(self.talker.get_text_embeddings()(ids))

    def _codec_embed(self, ids: list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        key = (tuple(map(tuple, ids)), dtype)
        if key not in self._codec_cache:
            device_ids = host_to_device(torch.tensor(ids, dtype=dtype), self.talker.device)
            self._codec_cache[key] = self.talker.get_input_embeddings()(device_ids)
        return self._codec_cache[key]

    def _codec_pads(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        """The codec pad's embedding `count` times, [1, count, H] (a view of one lookup)."""
        return self._codec_embed([[self.config.talker_config.codec_pad_id]], dtype).expand(-1, count, -1)

    def _tokenize(self, text: str) -> torch.Tensor:
        """qwen-tts's `_tokenize_texts` for one text, the ids sent to the device without blocking the host."""
        ids = self.wrapper.processor(text=text, return_tensors="pt", padding=True)["input_ids"]
        return host_to_device(ids.unsqueeze(0) if ids.dim() == 1 else ids, self.talker.device)

    def special_embeds(self, dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tts_bos, tts_eos, tts_pad), each [1, 1, H], projected together as qwen-tts does."""
        if self._special is None:
            ids = [[self.config.tts_bos_token_id, self.config.tts_eos_token_id, self.config.tts_pad_token_id]]
            with torch.inference_mode():
                embeds = self._text_embed(torch.tensor(ids, device=self.talker.device, dtype=dtype))
            self._special = embeds.chunk(3, dim=1)
        return self._special

    def _reference_codes_embed(self, codes: torch.Tensor) -> torch.Tensor:
        """A clone's reference frames [T, 16] as talker inputs [1, T, H]: each frame's 16 code embeddings summed."""
        codes = codes.to(self.talker.device)
        tables = [self.talker.get_input_embeddings(), *self.talker.code_predictor.get_input_embeddings()]
        embeds = [table(codes[:, group : group + 1]) for group, table in enumerate(tables)]
        return torch.cat(embeds, dim=1).sum(1).unsqueeze(0)

    @torch.inference_mode()
    def build(
        self, text: str, speaker: str, language: str, instruct: str = "", voice: VoicePrompt | None = None
    ) -> torch.Tensor:
        """The prompt embeddings [T, H] for one request; speaker and language are the model's keys, and
        `voice` a Base model's cloned voice (then `speaker` is empty)."""
        w = self.wrapper
        talker_config = self.config.talker_config
        input_id = self._tokenize(w._build_assistant_text(text))
        parts: list[torch.Tensor] = []
        if instruct and self.honours_instruct:
            instruct_id = self._tokenize(w._build_instruct_text(instruct))
            parts.append(self._text_embed(instruct_id))

        dtype = input_id.dtype
        speaker_embed = None
        if voice is not None:
            speaker_embed = voice.speaker_embedding.to(self.talker.device).to(self.talker.dtype)
        elif speaker:
            speaker_embed = self._codec_embed([[talker_config.spk_id[speaker.lower()]]], dtype)
        language_id = None
        if language.lower() != "auto":
            language_id = talker_config.codec_language_id[language.lower()]
        if language.lower() in ("chinese", "auto") and speaker and talker_config.spk_is_dialect[speaker.lower()]:
            language_id = talker_config.codec_language_id[talker_config.spk_is_dialect[speaker.lower()]]

        tts_bos, tts_eos, tts_pad = self.special_embeds(dtype)
        if language_id is None:
            tags = [
                [talker_config.codec_nothink_id, talker_config.codec_think_bos_id, talker_config.codec_think_eos_id]
            ]
        else:
            tags = [
                [
                    talker_config.codec_think_id,
                    talker_config.codec_think_bos_id,
                    language_id,
                    talker_config.codec_think_eos_id,
                ]
            ]
        codec = [self._codec_embed(tags, dtype)]
        if speaker_embed is not None:
            codec.append(speaker_embed.view(1, 1, -1))
        codec.append(self._codec_embed([[talker_config.codec_pad_id, talker_config.codec_bos_id]], dtype))
        codec_embed = torch.cat(codec, dim=1)

        role = self._text_embed(input_id[:, :3])  # <|im_start|>assistant\n
        prefix = torch.cat((tts_pad.expand(-1, codec_embed.shape[1] - 2, -1), tts_bos), dim=1) + codec_embed[:, :-1]
        if voice is not None and voice.icl:  # the reference transcript and text, then the reference frames
            ref_id = self._tokenize(w._build_ref_text(voice.ref_text))
            texts = self._text_embed(torch.cat([ref_id[:, 3:-2], input_id[:, 3:-5]], dim=-1))
            texts = torch.cat([texts, tts_eos], dim=1)
            texts = texts + self._codec_pads(texts.shape[1], dtype)
            bos = self._codec_embed([[talker_config.codec_bos_id]], dtype)
            frames = torch.cat([bos, self._reference_codes_embed(voice.ref_codes)], dim=1)
            parts.append(torch.cat([role, prefix, texts, frames + tts_pad], dim=1))
            return torch.cat(parts, dim=1)[0]
        body = self._text_embed(input_id[:, 3:-5])  # the text itself, without the closing template
        pads = self._codec_pads(body.shape[1] + 1, dtype)
        start = tts_pad + self._codec_embed([[talker_config.codec_bos_id]], dtype)
        parts.append(torch.cat([role, prefix, torch.cat((body, tts_eos), dim=1) + pads, start], dim=1))
        return torch.cat(parts, dim=1)[0]

    def pad_embed(self) -> torch.Tensor:
        """What every decode step adds to its input in non-streaming text mode: the projected pad [H]."""
        return self.special_embeds()[2].reshape(-1)
