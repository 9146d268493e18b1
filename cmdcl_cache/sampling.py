"""Which source frames of a video are encoded: a pure function of (frame count, fps, policy).

Two modes, both uniform over the whole video, each sampled frame at the centre of one of T equal bins
(index = floor((i + 0.5) * n / T)), so the first and last seconds are covered as evenly as the middle:

- rate (default): T = round(duration * fps), clamped to [min_frames, max_frames] and then to n, the number
  of source frames, so rate mode never repeats a frame. A 2-hour video at 1 fps with max_frames 4096 gets
  4096 frames spread over the two hours; a 3-second clip with min_frames 8 gets 8 of its ~75 frames.
- exact (`--num-frames N`): exactly N frames per video. When N > n (very short videos, a one-frame video)
  the centre-of-bin formula repeats source indices in order (e.g. n=2, N=4 -> 0 0 1 1), so every video
  has the same T, which some consumers rely on.

Heads resample T frames from the cache, so one cache serves experiments with different T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class SamplingError(ValueError):
    """The video's frame count or frame rate cannot be sampled (no frames, no usable fps)."""


@dataclass(frozen=True)
class SamplingPolicy:
    fps: float = 1.0              # frames per second of video, rate mode
    min_frames: int = 8           # rate mode lower bound (before the cap at the source frame count)
    max_frames: int = 4096        # rate mode upper bound
    num_frames: int | None = None  # exact mode: exactly this many frames per video

    def __post_init__(self):
        if self.num_frames is not None:
            if int(self.num_frames) < 1:
                raise ValueError(f"--num-frames must be >= 1, got {self.num_frames}")
            return
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"--fps must be a positive number, got {self.fps}")
        if self.min_frames < 1 or self.max_frames < self.min_frames:
            raise ValueError(f"need 1 <= --min-frames <= --max-frames, got {self.min_frames} and "
                             f"{self.max_frames}")

    @property
    def mode(self) -> str:
        return "exact" if self.num_frames is not None else "rate"

    def to_dict(self) -> dict:
        """What goes into the shard provenance: only the fields that decide the frames."""
        if self.num_frames is not None:
            return {"mode": "exact", "num_frames": int(self.num_frames), "placement": "bin-centre"}
        return {"mode": "rate", "fps": float(self.fps), "min_frames": int(self.min_frames),
                "max_frames": int(self.max_frames), "placement": "bin-centre"}

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingPolicy":
        if d.get("mode") == "exact":
            return cls(num_frames=int(d["num_frames"]))
        return cls(fps=float(d["fps"]), min_frames=int(d["min_frames"]), max_frames=int(d["max_frames"]))


def num_samples(num_source_frames: int, source_fps: float, policy: SamplingPolicy) -> int:
    n = int(num_source_frames)
    if policy.num_frames is not None:
        return int(policy.num_frames)
    duration = n / source_fps
    t = int(round(duration * policy.fps))
    t = min(max(t, policy.min_frames), policy.max_frames)
    return max(1, min(t, n))


def sample_frames(num_source_frames: int, source_fps: float,
                  policy: SamplingPolicy) -> tuple[np.ndarray, np.ndarray]:
    """Source frame indices (int64 [T], non-decreasing) and their timestamps in seconds (float64 [T])."""
    n = int(num_source_frames)
    if n < 1:
        raise SamplingError(f"the video has {num_source_frames} frames")
    if not (source_fps > 0 and math.isfinite(source_fps)):
        raise SamplingError(f"the video reports a frame rate of {source_fps}")
    t = num_samples(n, source_fps, policy)
    # Integer arithmetic: floor((2i + 1) * n / 2T) has no float rounding at bin edges.
    i = np.arange(t, dtype=np.int64)
    idx = ((2 * i + 1) * n) // (2 * t)
    return idx, idx.astype(np.float64) / float(source_fps)

