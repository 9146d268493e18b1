"""Which source frames of a video are encoded: a pure function of (frame count, fps, timestamps, policy).

Both modes are uniform in time over the whole video: T target times at the centres of T equal bins of
the video's duration, each taking the frame on screen at that time, so the first and last seconds are
covered as evenly as the middle:

- rate (default): T = round(duration * fps), clamped to [min_frames, max_frames] and then to n, the number
  of source frames. A 2-hour video at 1 fps with max_frames 4096 gets 4096 frames spread over the two
  hours; a 3-second clip with min_frames 8 gets 8 of its ~75 frames.
- exact (`--num-frames N`): exactly N frames per video. When N > n (very short videos, a one-frame video)
  frames repeat in order (e.g. n=2, N=4 -> 0 0 1 1), so every video has the same T.

Timestamps are the decoder's presentation times (`pts`, seconds, presentation order). On a constant
frame rate video (pts_i = pts_0 + i / fps, to within a quarter of a frame) the frame on screen at the
centre of bin k is frame floor((2k + 1) n / 2T), computed in integers as it always was, so the frames
of a constant-rate video do not depend on timestamp rounding (and caches made before timestamps were
read keep their frames). On a variable-frame-rate video the same rule runs on the timestamps: the
duration is first pts to last pts plus one typical frame (the median interval), and a frame shown for
longer than a bin can be taken twice, even in rate mode: the video shows it that long.

Keyframes only (`--keyframes-only`, opt-in): each bin centre takes the keyframe nearest to it, so a
decoder decodes one frame per sample instead of up to a keyframe interval of them. A sample then lies up
to half the largest keyframe interval away from its bin centre (the stored timestamp is the keyframe's
own, exact). Rate mode takes each keyframe at most once: a keyframe nearest to two bin centres is one
sample, so T can fall below the rate's count (and below --min-frames); exact mode repeats it, keeping N.

Heads resample T frames from the cache, so one cache serves experiments with different T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class SamplingError(ValueError):
    """The video's frame count, frame rate or timestamps cannot be sampled."""


@dataclass(frozen=True)
class SamplingPolicy:
    fps: float = 1.0              # frames per second of video, rate mode
    min_frames: int = 8           # rate mode lower bound (before the cap at the source frame count)
    max_frames: int = 4096        # rate mode upper bound
    num_frames: int | None = None  # exact mode: exactly this many frames per video
    keyframes_only: bool = False   # each sample is the keyframe nearest its bin centre

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
        placement = "nearest-keyframe" if self.keyframes_only else "bin-centre"
        if self.num_frames is not None:
            return {"mode": "exact", "num_frames": int(self.num_frames), "placement": placement}
        return {"mode": "rate", "fps": float(self.fps), "min_frames": int(self.min_frames),
                "max_frames": int(self.max_frames), "placement": placement}

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingPolicy":
        keys = d.get("placement") == "nearest-keyframe"
        if d.get("mode") == "exact":
            return cls(num_frames=int(d["num_frames"]), keyframes_only=keys)
        return cls(fps=float(d["fps"]), min_frames=int(d["min_frames"]), max_frames=int(d["max_frames"]),
                   keyframes_only=keys)


@dataclass(frozen=True)
class Timing:
    """When a video's frames are shown: what sampling needs, and what the cache stores per video."""
    pts: np.ndarray        # float64 [n] seconds, presentation order
    fps: float             # the decoder's rate when constant, else n / duration
    duration: float        # seconds from the first frame's start to the last frame's end
    constant_rate: bool    # pts_i = pts_0 + i / fps to within a quarter of a frame

    @property
    def num_frames(self) -> int:
        return len(self.pts)


def video_timing(num_source_frames: int, source_fps: float, pts=None) -> Timing:
    """Check what a decoder reports and derive the duration. pts None: frames at i / fps."""
    n = int(num_source_frames)
    if n < 1:
        raise SamplingError(f"the video has {num_source_frames} frames")
    fps_ok = source_fps is not None and source_fps > 0 and math.isfinite(source_fps)
    if pts is None:
        if not fps_ok:
            raise SamplingError(f"the video reports a frame rate of {source_fps}")
        return Timing(np.arange(n) / float(source_fps), float(source_fps), n / float(source_fps), True)
    pts = np.asarray(pts, dtype=np.float64)
    why = unusable_timestamps(pts, n)
    if why:
        raise SamplingError(f"the decoder's timestamps are unusable: {why}")
    if fps_ok:
        grid = pts[0] + np.arange(n) / float(source_fps)
        if np.abs(pts - grid).max() <= 0.25 / source_fps:
            return Timing(pts, float(source_fps), n / float(source_fps), True)
    steps = np.diff(pts)
    if len(steps) == 0 and not fps_ok:
        raise SamplingError(f"a one-frame video with a frame rate of {source_fps}")
    frame = float(np.median(steps[steps > 0])) if len(steps) else 1.0 / source_fps
    duration = float(pts[-1] - pts[0] + frame)
    return Timing(pts, n / duration, duration, False)


def unusable_timestamps(pts: np.ndarray, n: int) -> str | None:
    """Why a decoder's timestamps [n] cannot be sampled from, or None when they can."""
    if pts.shape != (n,):
        return f"{pts.size} timestamps for {n} frames"
    if not np.isfinite(pts).all():
        return "frames without a presentation time"
    if np.abs(pts).max() > 1e7:   # FFmpeg's "no timestamp" value times a time base, e.g. AVI with B-frames
        return f"a timestamp of {pts[np.abs(pts).argmax()]:.3g} s"
    if n > 1 and pts[-1] == pts[0]:
        return "every frame has the same timestamp"
    if n > 1 and (np.diff(pts) < 0).any():
        return "they are not in presentation order"
    return None


def num_samples(num_source_frames: int, source_fps: float, policy: SamplingPolicy,
                duration: float | None = None) -> int:
    n = int(num_source_frames)
    if policy.num_frames is not None:
        return int(policy.num_frames)
    duration = n / source_fps if duration is None else duration
    t = int(round(duration * policy.fps))
    t = min(max(t, policy.min_frames), policy.max_frames)
    return max(1, min(t, n))


def sample_timing(timing: Timing, policy: SamplingPolicy, keyframes=None) -> tuple[np.ndarray, np.ndarray]:
    """Source frame indices (int64 [T], non-decreasing) and their presentation times (float64 [T]).
    keyframes: frame indices of the keyframes, needed by keyframes-only sampling."""
    n = timing.num_frames
    if policy.keyframes_only:
        idx = nearest_keyframes(timing, policy, keyframes)
    elif timing.constant_rate:
        t = num_samples(n, timing.fps, policy)
        # Integer arithmetic: floor((2i + 1) * n / 2T) has no float rounding at bin edges.
        i = np.arange(t, dtype=np.int64)
        idx = ((2 * i + 1) * n) // (2 * t)
    else:
        t = num_samples(n, timing.fps, policy, timing.duration)
        idx = frames_shown_at(timing.pts, bin_centres(timing.pts[0], timing.duration, t))
    return idx, timing.pts[idx]


def nearest_keyframes(timing: Timing, policy: SamplingPolicy, keyframes) -> np.ndarray:
    if keyframes is None or len(keyframes) == 0:
        raise SamplingError("--keyframes-only: the decoder lists no keyframes for this video")
    keys = np.unique(np.asarray(keyframes, dtype=np.int64))
    if keys[0] < 0 or keys[-1] >= timing.num_frames:
        raise SamplingError(f"keyframe indices outside the video's {timing.num_frames} frames")
    t = num_samples(len(keys), timing.fps, policy, timing.duration)   # rate mode: <= one per keyframe
    centres = bin_centres(timing.pts[0], timing.duration, t)
    key_pts = timing.pts[keys]
    after = np.clip(np.searchsorted(key_pts, centres), 0, len(keys) - 1)
    before = np.clip(after - 1, 0, len(keys) - 1)
    # Ties (within a millisecond: decord's timestamps are float32) go to the earlier keyframe, so that
    # backends agree.
    nearer_before = np.abs(centres - key_pts[before]) <= np.abs(key_pts[after] - centres) + 1e-3
    idx = keys[np.where(nearer_before, before, after)]
    # Rate mode: a keyframe nearest to two centres is taken once (the same image twice is not a sample).
    return np.unique(idx) if policy.num_frames is None else idx


def bin_centres(start: float, duration: float, t: int) -> np.ndarray:
    return start + (np.arange(t) + 0.5) * (duration / t)


def frames_shown_at(pts: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Index of the frame on screen at each time: the last one whose pts is <= the time. A nanosecond of
    slack puts a time that float arithmetic lands just before a frame's start on that frame."""
    idx = np.searchsorted(pts, times + 1e-9, side="right") - 1
    return np.clip(idx, 0, len(pts) - 1).astype(np.int64)


def sample_frames(num_source_frames: int, source_fps: float, policy: SamplingPolicy,
                  pts=None) -> tuple[np.ndarray, np.ndarray]:
    """Indices and timestamps of the sampled frames; see the module docstring."""
    return sample_timing(video_timing(num_source_frames, source_fps, pts), policy)
