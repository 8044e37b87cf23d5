"""The released CustomVoice speaker and language tables.

Ids are those of the published `Qwen3-TTS-12Hz-*-CustomVoice` config.json (talker_config.spk_id,
codec_language_id, spk_is_dialect). The tiny checkpoint copies them so tests exercise the same lookup
paths as the real model; the service itself always reads the loaded model's own tables.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Speaker:
    name: str
    codec_id: int
    dialect: str | None
    description: str
    native_language: str


SPEAKERS: tuple[Speaker, ...] = (
    Speaker("Vivian", 3065, None, "Bright, slightly edgy young female voice", "Chinese"),
    Speaker("Serena", 3066, None, "Warm, gentle young female voice", "Chinese"),
    Speaker("Uncle_Fu", 3010, None, "Seasoned male voice with a low, mellow timbre", "Chinese"),
    Speaker(
        "Dylan", 2878, "beijing_dialect", "Youthful Beijing male voice, clear and natural", "Chinese (Beijing dialect)"
    ),
    Speaker("Eric", 2875, "sichuan_dialect", "Lively Chengdu male voice, slightly husky", "Chinese (Sichuan dialect)"),
    Speaker("Ryan", 3061, None, "Dynamic male voice with strong rhythmic drive", "English"),
    Speaker("Aiden", 2861, None, "Sunny American male voice with a clear midrange", "English"),
    Speaker("Ono_Anna", 2873, None, "Playful Japanese female voice, light and nimble", "Japanese"),
    Speaker("Sohee", 2864, None, "Warm Korean female voice with rich emotion", "Korean"),
)

# Codec ids of the language tags; dialect entries are selected through spk_is_dialect only.
LANGUAGE_IDS: dict[str, int] = {
    "chinese": 2055,
    "english": 2050,
    "german": 2053,
    "spanish": 2054,
    "japanese": 2058,
    "french": 2061,
    "korean": 2064,
    "russian": 2069,
    "italian": 2070,
    "portuguese": 2071,
    "beijing_dialect": 2074,
    "sichuan_dialect": 2062,
}

SPEAKERS_BY_KEY: dict[str, Speaker] = {s.name.lower(): s for s in SPEAKERS}
