"""A cloned voice as the engine uses it: what a Base model's `create_voice_clone_prompt` extracts from
reference audio, kept as a file so that a saved voice speaks the same way after a restart.

Two modes, as in qwen-tts: with a transcript, the reference codes and text go into every prompt (ICL,
the closer clone); without one, only the speaker embedding (x-vector) does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors


@dataclass(frozen=True, eq=False)
class VoicePrompt:
    speaker_embedding: torch.Tensor  # [H]: the speaker encoder's x-vector, the talker's speaker slot
    ref_codes: torch.Tensor | None = None  # [T, 16] codec codes of the reference audio (ICL mode only)
    ref_text: str = ""  # its transcript (ICL mode only)

    @property
    def icl(self) -> bool:
        return self.ref_codes is not None

    def to_bytes(self) -> bytes:
        """safetensors, so that loading a voice file never runs code (unlike a pickle)."""
        tensors = {"speaker_embedding": self.speaker_embedding.detach().to("cpu", torch.float32).contiguous()}
        if self.ref_codes is not None:
            tensors["ref_codes"] = self.ref_codes.detach().to("cpu", torch.long).contiguous()
        return save_tensors(tensors, metadata={"ref_text": json.dumps(self.ref_text)})

    @classmethod
    def from_bytes(cls, data: bytes) -> VoicePrompt:
        tensors = load_tensors(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
        return cls(
            speaker_embedding=tensors["speaker_embedding"],
            ref_codes=tensors.get("ref_codes"),
            ref_text=json.loads(metadata.get("ref_text", '""')),
        )


def extract_voice_prompt(wrapper, audio: np.ndarray, sample_rate: int, transcript: str = "") -> VoicePrompt:
    """Run a loaded Base model's own `create_voice_clone_prompt` on mono float32 audio."""
    transcript = transcript.strip()
    (item,) = wrapper.create_voice_clone_prompt(
        ref_audio=(np.asarray(audio, dtype=np.float32), int(sample_rate)),
        ref_text=transcript or None,
        x_vector_only_mode=not transcript,
    )
    return VoicePrompt(
        speaker_embedding=item.ref_spk_embedding.detach().to("cpu", torch.float32),
        ref_codes=None if item.ref_code is None else item.ref_code.detach().to("cpu"),
        ref_text=transcript,
    )
