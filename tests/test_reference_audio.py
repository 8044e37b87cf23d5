"""Reference-audio uploads: every common format decodes to 24 kHz mono; every hostile file is refused
with a message for the `audio` field (the HTTP tests check the 400s on the route)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.clips import GOOD, HOSTILE
from tts_service.reference_audio import ReferenceAudioError, decode_reference


@pytest.mark.parametrize("name", sorted(GOOD))
def test_common_formats_decode_to_24khz_mono(name: str) -> None:
    clip = decode_reference(GOOD[name]())
    assert clip.sample_rate == 24_000 and clip.samples.ndim == 1 and clip.samples.dtype == np.float32
    assert 1.9 <= clip.seconds <= 3.2
    assert 0.1 < np.abs(clip.samples).max() <= 1.0


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_uploads_are_refused_naming_the_field(name: str) -> None:
    make, message = HOSTILE[name]
    with pytest.raises(ReferenceAudioError, match=message) as refused:
        decode_reference(make())
    assert refused.value.field == "audio"
