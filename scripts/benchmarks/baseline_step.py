"""Wave 1's frame step, kept only as the benchmark baseline of `bench.py step` ("today's _step").

Wave 1 advanced streams with qwen-tts's own talker forward (whose code predictor runs HF `generate`) on
a shared `DynamicCache` that is left-padded and concatenated when a stream joins and re-indexed when one
leaves. This is that step, with its prompt capture and cache surgery, minus the thread, the handles and
the audio. Serving no longer uses it; src/tts_service/frame_step.py replaced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tts_service.engine import SynthesisRequest, TTSEngine


@dataclass
class _Row:
    """One stream's place in the running batch."""

    budget: int
    text_hidden: Any  # [L, H]: the text to add step by step (qwen-tts streams the text in this way)
    generated: int = 1  # codec tokens sampled so far (the prefill samples the first)
    steps: int = 0
    codes: list = field(default_factory=list)  # per frame: [16] codes on the CPU
    finished: bool = False
    truncated: bool = False


class _PromptCaptured(Exception):
    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs = kwargs


class Wave1Step:
    """`admit(requests)` prefills and joins them; `step()` advances every row by one frame, as wave 1 did."""

    def __init__(self, engine: TTSEngine) -> None:
        import torch

        self.engine = engine
        self.torch = torch
        self.wrapper = engine.model  # qwen_tts.Qwen3TTSModel
        self.model = engine.model.model  # Qwen3TTSForConditionalGeneration
        self.talker = self.model.talker
        self.eos = int(self.model.config.talker_config.codec_eos_token_id)
        self._rows: list[_Row] = []
        self._state: dict[str, Any] = {}

    def _generation_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.engine.settings.greedy:
            kwargs.update(do_sample=False, subtalker_dosample=False)
        return kwargs

    def _capture_prompt(self, requests: list[SynthesisRequest]) -> dict[str, Any]:
        """qwen-tts's own prompt for these requests: run generate_custom_voice up to the talker's
        generate call and take its arguments (left-padded embeddings, mask, trailing text, sampling)."""

        def capture(**kwargs: Any) -> None:
            raise _PromptCaptured(kwargs)

        self.talker.generate = capture  # instance attribute; only this thread uses the model now
        try:
            self.wrapper.generate_custom_voice(
                text=[r.text for r in requests],
                speaker=[r.speaker for r in requests],
                language=[r.language for r in requests],
                instruct=[r.instruct for r in requests],
                **self._generation_kwargs(),
            )
        except _PromptCaptured as captured:
            return captured.kwargs
        finally:
            del self.talker.generate
        raise RuntimeError("qwen-tts did not reach the talker's generate call")

    def admit(self, requests: list[SynthesisRequest]) -> None:
        torch = self.torch
        prompt = self._capture_prompt(requests)
        self._sampling = {k: prompt[k] for k in ("do_sample", "top_k", "top_p", "temperature", "repetition_penalty")}
        self._subtalker = {k: prompt[k] for k in prompt if k.startswith("subtalker_")}
        self._suppress = torch.tensor(prompt["suppress_tokens"], device=self.talker.device, dtype=torch.long)
        self._pad_embed = prompt["tts_pad_embed"]  # [1, 1, H]
        embeds, mask = prompt["inputs_embeds"], prompt["attention_mask"]
        out = self.talker(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
        rows = [
            _Row(
                budget=self.engine.frame_budget(r.text),
                text_hidden=prompt["trailing_text_hidden"][i],
            )
            for i, r in enumerate(requests)
        ]
        vocab = out.logits.shape[-1]
        seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=out.logits.device)
        generated = torch.zeros(len(rows), dtype=torch.long, device=out.logits.device)
        first = self._sample(out.logits[:, -1, :].float(), seen, generated)
        seen[torch.arange(len(rows)), first] = True
        new = {
            "cache": out.past_key_values,
            "mask": mask,
            "last": first.unsqueeze(1),
            "past_hidden": out.past_hidden,
            "seen": seen,
        }
        self._state = self._merge(self._state, new) if self._state else new
        self._rows.extend(rows)

    def _merge(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        """Join two running batches: left-pad the shorter cache and mask, then stack the rows."""
        torch = self.torch
        length = max(a["mask"].shape[1], b["mask"].shape[1])
        for part in (a, b):
            pad = length - part["mask"].shape[1]
            if pad:
                part["mask"] = torch.nn.functional.pad(part["mask"], (pad, 0))
                for layer in part["cache"].layers:
                    layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, pad, 0))
                    layer.values = torch.nn.functional.pad(layer.values, (0, 0, pad, 0))
        for layer_a, layer_b in zip(a["cache"].layers, b["cache"].layers, strict=True):
            layer_a.keys = torch.cat([layer_a.keys, layer_b.keys])
            layer_a.values = torch.cat([layer_a.values, layer_b.values])
        return {
            "cache": a["cache"],
            "mask": torch.cat([a["mask"], b["mask"]]),
            "last": torch.cat([a["last"], b["last"]]),
            "past_hidden": torch.cat([a["past_hidden"], b["past_hidden"]]),
            "seen": torch.cat([a["seen"], b["seen"]]),
        }

    def _sample(self, logits: Any, seen: Any, generated: Any) -> Any:
        """The talker's logits processing, per row: repetition penalty over its own codes, no codec
        special tokens, no end-of-speech before the second token, then greedy or top-k/top-p sampling."""
        torch = self.torch
        penalty = float(self._sampling["repetition_penalty"] or 1.0)
        if penalty != 1.0:
            penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
            logits = torch.where(seen, penalised, logits)
        logits[:, self._suppress] = -float("inf")
        logits[generated < 2, self.eos] = -float("inf")  # qwen-tts passes min_new_tokens=2
        if not self._sampling["do_sample"]:
            return logits.argmax(dim=-1)
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        for warper in (
            TemperatureLogitsWarper(float(self._sampling["temperature"])),
            TopKLogitsWarper(int(self._sampling["top_k"])),
            TopPLogitsWarper(float(self._sampling["top_p"])),
        ):
            logits = warper(None, logits)
        return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1).squeeze(1)

    def step(self) -> None:
        torch = self.torch
        state, rows = self._state, self._rows
        device = state["mask"].device
        batch, length = state["mask"].shape
        real = state["mask"].sum(dim=1)
        mask = torch.cat([state["mask"], torch.ones(batch, 1, dtype=state["mask"].dtype, device=device)], dim=1)
        # Each row's next position is its own length, whatever padding the shared cache holds.
        self.talker.rope_deltas = (real - length).unsqueeze(1)
        text = torch.stack(
            [
                row.text_hidden[row.steps] if row.steps < row.text_hidden.shape[0] else self._pad_embed[0, 0]
                for row in rows
            ]
        ).unsqueeze(1)
        out = self.talker(
            input_ids=state["last"],
            attention_mask=mask,
            past_key_values=state["cache"],
            cache_position=torch.tensor([length], device=device),
            use_cache=True,
            past_hidden=state["past_hidden"],
            trailing_text_hidden=text,  # per row, so generation_step 0 picks each row's own step
            tts_pad_embed=self._pad_embed,
            generation_step=0,
            **self._subtalker,
        )
        frames = out.hidden_states[1].cpu()  # [B, 16]: the frame completed by this step
        generated = torch.tensor([row.generated for row in rows], device=device)
        token = self._sample(out.logits[:, -1, :].float(), state["seen"], generated)
        state["seen"][torch.arange(batch, device=device), token] = True
        state.update(mask=mask, last=token.unsqueeze(1), past_hidden=out.past_hidden)
        tokens = token.tolist()
        for row, frame, next_token in zip(rows, frames, tokens, strict=True):
            row.codes.append(frame)
            row.steps += 1
            row.generated += 1
            if next_token == self.eos:
                row.finished = True
            elif len(row.codes) >= row.budget:
                row.finished, row.truncated = True, True
        self._drop_done()

    def _drop_done(self) -> None:
        torch = self.torch
        keep = [index for index, row in enumerate(self._rows) if not row.finished]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._state = {}
            return
        state = self._state
        index = torch.tensor(keep, device=state["mask"].device)
        mask = state["mask"].index_select(0, index)
        # Columns that only ever held the padding of rows now gone are dropped from the cache.
        start = int((mask.sum(dim=0) > 0).nonzero()[0])
        state["mask"] = mask[:, start:]
        for layer in state["cache"].layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        for key in ("last", "past_hidden", "seen"):
            state[key] = state[key].index_select(0, index)
