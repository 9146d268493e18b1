"""decord (the default backend): its own frame index, random access by index."""

from __future__ import annotations

import numpy as np

from ..sampling import unusable_timestamps


class DecordVideo:
    backend = "decord"

    def __init__(self, path: str, threads: int = 1):
        import decord
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

    @property
    def key_indices(self) -> np.ndarray:
        return np.asarray(self._vr.get_key_indices(), dtype=np.int64)

    def get_batch(self, indices) -> np.ndarray:
        return self._vr.get_batch([int(i) for i in indices]).asnumpy()
