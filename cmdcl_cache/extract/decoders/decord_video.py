"""decord (the fallback of PyAV): its own frame index, random access by index.

decord seeks by its own frame index, which is wrong where the container's timestamps do not tell the
frames apart: on AVI with B-frames and MPEG-PS it returns other frames than those asked for once it seeks
(checked frame by frame). On such a file it decodes every frame in order from the start instead
(`sequential`), which gives the right frames, and it refuses keyframes-only sampling (its keyframe index
is in decode order there). MPEG-TS it refuses: its frames are shifted even when decoded in order."""

from __future__ import annotations

import numpy as np

from cmdcl_cache.cache.sampling import unusable_timestamps

SEQUENTIAL_SUFFIXES = (".avi", ".mpg", ".mpeg", ".vob")
REFUSED_SUFFIXES = (".ts", ".m2ts", ".mts")   # decord's frame k is another frame even decoded in order


class DecordVideo:
    backend = "decord"

    def __init__(self, path: str, threads: int = 1):
        import decord
        if path.lower().endswith(REFUSED_SUFFIXES):
            raise ValueError("decord returns wrong frames on MPEG-TS (checked frame by frame): not used")
        self._vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
        self.num_frames = len(self._vr)
        self.fps = float(self._vr.get_avg_fps())
        # [start, end] seconds per frame (float32 inside decord: ~0.5 ms steps at two hours). On an AVI
        # file with B-frames decord reports FFmpeg's "no timestamp" for every frame while its frames are
        # right: such a video is sampled at index / fps, as before timestamps were read.
        pts = (self._vr.get_frame_timestamp(range(self.num_frames))[:, 0].astype(np.float64)
               if self.num_frames else np.zeros(0))
        self.pts = pts if unusable_timestamps(pts, self.num_frames) is None else None
        self.decoded = None   # decord does not say how many frames it decoded
        self.sequential = self.pts is None or path.lower().endswith(SEQUENTIAL_SUFFIXES)
        self._next, self._last = 0, None   # sequential: the next frame's index; (index, frame) of the last

    def _frame_in_order(self, i: int) -> np.ndarray:
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        if i < self._next:
            self._vr.seek(0)
            self._next = 0
        while self._next <= i:
            frame = self._vr.next()
            self._next += 1
        self._last = (i, frame.asnumpy())
        return self._last[1]

    @property
    def key_indices(self) -> np.ndarray:
        if self.sequential:
            raise ValueError("keyframes-only sampling with decord needs a container with presentation "
                             "times (decord's keyframe index of AVI / MPEG-TS / MPEG-PS is in decode order)")
        return np.asarray(self._vr.get_key_indices(), dtype=np.int64)

    def get_batch(self, indices) -> np.ndarray:
        if self.sequential:
            return np.stack([self._frame_in_order(int(i)) for i in indices])
        return self._vr.get_batch([int(i) for i in indices]).asnumpy()
