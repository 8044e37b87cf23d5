"""How a request's audio is cut into chunks: the stream plan (a small first chunk for a fast start, then
larger ones), the whole-file plan, and when a stream may start with a quick first chunk."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

# Quick start: a stream that starts while the engine has time to spare gets a first chunk of this many
# frames instead of its plan's, and ramps from there (1, 1, 2, 4, 8, 16, ...): first audio after one frame
# step instead of four. Its next chunk is then due 80 ms after its first audio, so it is given only while
# every other stream has at least QUICK_START_HEADROOM_S of audio in hand (none is ramping up, each of
# whose chunks would be as urgent) and steps come at least 3x faster than real time (measured on a CPU:
# a first chunk of 1 frame halves first audio, but listeners run dry when several streams ramp from 1 at
# once or a stream gets under about 4x real time; docs/PERFORMANCE.md).
QUICK_START_FRAMES = 1
QUICK_START_HEADROOM_S = 0.5
QUICK_START_MAX_STEP_S = 0.080 / 3


def quick_start_fits(others_in_hand: Iterable[float | None], step_interval: float | None, waiting: bool) -> bool:
    """Whether a stream starting now may take a quick first chunk: no request waits for a slot, recent steps
    came at least 3x faster than real time (`step_interval`, seconds; None: none measured yet), and every
    other stream has `QUICK_START_HEADROOM_S` of audio in hand (None: it has sent no audio yet)."""
    if waiting or step_interval is None or step_interval > QUICK_START_MAX_STEP_S:
        return False
    return all(in_hand is not None and in_hand >= QUICK_START_HEADROOM_S for in_hand in others_in_hand)


@dataclass(frozen=True)
class ChunkPlan:
    """Frames per decoded chunk: a small first chunk for a fast start, larger ones for efficiency.

    With `ramp`, chunks grow from the first to the steady size but none is longer than all the audio
    sent before it (4, 4, 8, 16, 16, ... frames): a listener who starts playing at the first byte keeps
    hearing audio whenever generation runs at 1.75x real time or better. Jumping from 4 frames straight
    to 16 needs 4x, which a busy GPU (32 streams) does not give every stream."""

    first_frames: int = 4
    frames: int = 16
    left_context: int = 25  # qwen-tts's own chunked_decode uses 25
    ramp: bool = True
    streamed: bool = True  # a listener hears each chunk as it comes (else the chunks make one file)

    def target(self, decoded: int) -> int:
        if decoded == 0:
            return self.first_frames
        return min(self.frames, max(self.first_frames, decoded)) if self.ramp else self.frames

    def quick(self) -> ChunkPlan:
        """This plan with a quick start's first chunk (never larger than its own)."""
        return replace(self, first_frames=min(QUICK_START_FRAMES, self.first_frames))

    def window_lengths(self) -> tuple[int, ...]:
        """The window lengths (new frames plus left context) a stream's chunks take until they are steady."""
        lengths, decoded = [], 0
        while True:
            chunk = self.target(decoded)
            lengths.append(chunk + min(decoded, self.left_context))
            if chunk == self.frames and decoded >= self.left_context:
                return tuple(sorted(set(lengths)))
            decoded += chunk


def window_lengths(plans: Iterable[ChunkPlan]) -> tuple[int, ...]:
    """Every window length these plans' streams take until they are steady (the decoder's graphs)."""
    return tuple(sorted({length for plan in plans for length in plan.window_lengths()}))


# qwen-tts decodes whole utterances in 300-frame chunks with 25 frames of left context; a whole-file
# request uses the same windows, so its audio equals qwen-tts's decode of the same codes.
WHOLE_FILE_PLAN = ChunkPlan(first_frames=300, frames=300, left_context=25, streamed=False)
