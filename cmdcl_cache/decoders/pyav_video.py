"""PyAV (FFmpeg's libraries, bundled in its wheels): the fallback for files decord refuses.

Open scans the stream's packets once (no decoding) for their timestamps and keyframes. A sampled frame
is reached by decoding forward from where the decoder stands when no keyframe lies in between, else by
seeking to the last keyframe at or before it: at 1 frame/s of a 30 fps video with a keyframe every
second or two this decodes about one GOP per sampled frame instead of every frame. `decoded` counts
the frames FFmpeg returned, so the benchmark can report decoded / sampled.

With keyframes-only sampling every target is a keyframe, so each is the first frame out after its seek.
(FFmpeg's `skip_frame = "NONKEY"` measured slower here with a seek per frame, so it is not used.) `decoded`
counts the frames FFmpeg returned; frames it decoded but held back for B-frame reordering are not seen.

Frames come out upright: a display matrix (phone videos) is applied with np.rot90, counter-clockwise
as FFmpeg and PyAV's `VideoFrame.rotation` define it.
"""

from __future__ import annotations

import bisect

import numpy as np


class PyAVVideo:
    backend = "pyav"

    def __init__(self, path: str, threads: int = 1):
        import av
        self._container = av.open(path)
        if not self._container.streams.video:
            self._container.close()
            raise ValueError("the file has no video stream")
        self._stream = stream = self._container.streams.video[0]
        stream.codec_context.thread_count = max(1, int(threads))
        self._ticks, self._keys = self._scan()
        self.num_frames = len(self._ticks)
        check_not_truncated(self.num_frames, stream.frames)
        self.pts = np.asarray(self._ticks, dtype=np.float64) * float(stream.time_base)
        self.key_indices = np.searchsorted(np.asarray(self._ticks), np.asarray(self._keys, dtype=np.int64))
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else float("nan")
        self.decoded = 0
        self._frames = None          # the decoder's output iterator since the last seek
        self._last = None            # (pts ticks, upright RGB array) of the last frame decoded

    def _scan(self) -> tuple[list[int], list[int]]:
        """Presentation times (stream ticks, sorted) of all frames and of the keyframes."""
        ticks, keys = [], []
        for packet in self._container.demux(self._stream):
            t = packet.pts if packet.pts is not None else packet.dts
            if t is None or packet.size == 0:
                continue     # the demuxer's end-of-stream packet, or a packet without timestamps
            ticks.append(t)
            if packet.is_keyframe:
                keys.append(t)
        return sorted(ticks), sorted(keys)

    def _seek_needed(self, target: int) -> bool:
        if self._frames is None or self._last is None or target < self._last[0]:
            return True
        k = bisect.bisect_right(self._keys, target) - 1
        return k >= 0 and self._keys[k] > self._last[0]   # a keyframe between here and the target

    def _frame_at(self, target: int) -> np.ndarray:
        if self._last is not None and self._last[0] == target:
            return self._last[1]
        if self._seek_needed(target):
            k = bisect.bisect_right(self._keys, target) - 1
            self._container.seek(self._keys[k] if k >= 0 else target, stream=self._stream,
                                 backward=True, any_frame=False)
            self._frames = self._container.decode(self._stream)
        for frame in self._frames:
            self.decoded += 1
            if frame.pts is None or frame.pts < target:
                continue
            if frame.pts > target:
                raise RuntimeError(f"PyAV returned no frame at pts {target} (next: {frame.pts})")
            self._last = (target, upright(frame))
            return self._last[1]
        raise RuntimeError(f"the stream ended before the frame at pts {target}")

    def get_batch(self, indices) -> np.ndarray:
        return np.stack([self._frame_at(self._ticks[int(i)]) for i in indices])

    def close(self) -> None:
        self._container.close()


def check_not_truncated(found: int, declared: int | None) -> None:
    """A file cut short keeps the header of the whole video (mp4 with its index at the front) and
    demuxes only the first part: fail it rather than cache a shorter video. decord refuses such files."""
    if declared and found < declared:
        raise ValueError(f"the file holds {found} of the {declared} frames its header lists (truncated?)")


def upright(frame) -> np.ndarray:
    """RGB array of a PyAV frame, with its display rotation (counter-clockwise degrees) applied."""
    rgb = frame.to_ndarray(format="rgb24")
    rotation = int(round(getattr(frame, "rotation", 0) or 0))
    if rotation % 90:
        raise ValueError(f"display rotation of {rotation} degrees: only multiples of 90 are supported")
    return np.rot90(rgb, (rotation // 90) % 4) if rotation % 360 else rgb
