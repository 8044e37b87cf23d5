"""Split a long text into segments that one generation can speak whole.

One generation is capped at `TTS_MAX_NEW_TOKENS` codec frames (2048 = 164 s), yet the text limit allows
far more speech than that. Long texts are cut at sentence ends, then at clause marks, then at spaces,
and only as a last resort inside a word; neighbouring pieces are packed back together while they fit.
Each segment is then generated in turn within the same request.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# A sentence ends after . ! ? … (followed by space) or after CJK full stops; a line break always ends one.
_SENTENCE = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+|(?<=[。！？])\s*|\n+")
_CLAUSE = re.compile(r"(?<=[,;:])\s+|(?<=[，、；：])\s*|\s+[-–—]+\s+")
_SPACE = re.compile(r"\s+")


def _spans(text: str, start: int, end: int, pattern: re.Pattern[str]) -> list[tuple[int, int]]:
    """Cut text[start:end] after each match of `pattern`; the separators stay with the left piece."""
    spans, cursor = [], start
    for match in pattern.finditer(text, start, end):
        if match.end() > cursor and match.start() > cursor:
            spans.append((cursor, match.end()))
            cursor = match.end()
    if cursor < end:
        spans.append((cursor, end))
    return spans


def split_text(text: str, fits: Callable[[str], bool], max_chars: int) -> list[str]:
    """Segments of `text` (stripped, in order, nothing dropped but whitespace at cuts) that each `fits`.

    `max_chars` bounds the hard cut inside a word; `fits` should accept any text of that length.
    """
    text = text.strip()
    if not text or fits(text):
        return [text] if text else []

    def pieces(start: int, end: int, level: int) -> list[tuple[int, int]]:
        if fits(text[start:end].strip()) or level == 3:
            if level == 3 and not fits(text[start:end].strip()):  # one unbroken run: cut by length
                return [(i, min(i + max_chars, end)) for i in range(start, end, max_chars)]
            return [(start, end)]
        pattern = (_SENTENCE, _CLAUSE, _SPACE)[level]
        out: list[tuple[int, int]] = []
        for s, e in _spans(text, start, end, pattern):
            out.extend(pieces(s, e, level + 1) if not fits(text[s:e].strip()) else [(s, e)])
        return out

    segments: list[str] = []
    current: tuple[int, int] | None = None
    for start, end in pieces(0, len(text), 0):
        if current is not None and fits(text[current[0] : end].strip()):
            current = (current[0], end)
            continue
        if current is not None:
            segments.append(text[current[0] : current[1]].strip())
        current = (start, end)
    if current is not None:
        segments.append(text[current[0] : current[1]].strip())
    return [segment for segment in segments if segment]
