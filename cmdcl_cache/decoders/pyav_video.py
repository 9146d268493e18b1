"""PyAV (FFmpeg's libraries, bundled in its wheels): the default backend of new caches.

Open scans the stream's packets once (no decoding) for their timestamps and keyframes. A sampled frame
is reached by decoding forward from where the decoder stands when no keyframe lies in between, else by
seeking to the last keyframe at or before it: at 1 frame/s of a 30 fps video with a keyframe every
second or two this decodes about one GOP per sampled frame instead of every frame.

Decode less (`skip=True`, the default): a packet whose frame no sample needs is sent to FFmpeg with
`skip_frame = "NONREF"`, so FFmpeg drops it unless it is a reference frame (one a later frame is predicted
from: I, P and reference B-frames are still decoded, so every frame that is returned has its exact
pixels). The packet of a needed frame, which may itself be a non-reference B-frame, goes with "DEFAULT".
Which frames are needed: those of the current `get_batch`, plus all the caller announced with
`will_need` (decode.py announces every sampled frame of the video), so that a needed frame whose packet
is demuxed while the decoder still reorders the frame before it is not dropped. Should a needed frame
still not come out (the next frame out is a later one), it is decoded again from its keyframe without
skipping (`retries` counts those), and only a file that fails that too is refused.

`decoded` counts the frames FFmpeg returned, so the benchmark can report decoded / sampled; frames it
skipped are not counted. With keyframes-only sampling every target is a keyframe, so each is the first
frame out after its seek. (FFmpeg's `skip_frame = "NONKEY"` measured slower here with a seek per frame,
so it is not used.)

Threads: `threads` FFmpeg threads of its default kind (slices). The pool gives each worker cores / workers
threads, one where workers >= cores (the pipeline's usual setting), where no threading can help. Frame
threading (`thread_type = "AUTO"`) was measured with one worker and 2 threads on 2 cores and was no faster
(it delays every frame after a seek by a frame per thread), so it is not turned on (BENCHMARKS.md).

Frames come out upright: a display matrix (phone videos) is applied with np.rot90, counter-clockwise
as FFmpeg and PyAV's `VideoFrame.rotation` define it.
"""

from __future__ import annotations

import bisect

import numpy as np


class PyAVVideo:
    backend = "pyav"

    def __init__(self, path: str, threads: int = 1, skip: bool = True):
        import av
        self._container = av.open(path)
        if not self._container.streams.video:
            self._container.close()
            raise ValueError("the file has no video stream")
        self._stream = stream = self._container.streams.video[0]
        stream.codec_context.thread_count = max(1, int(threads))   # FFmpeg's default, slice threads
        self._ticks, self._keys = self._scan()
        self.num_frames = len(self._ticks)
        check_not_truncated(self.num_frames, stream.frames)
        self.pts = np.asarray(self._ticks, dtype=np.float64) * float(stream.time_base)
        self.key_indices = np.searchsorted(np.asarray(self._ticks), np.asarray(self._keys, dtype=np.int64))
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else float("nan")
        self.skip = bool(skip)
        self._skipping = self.skip   # read per packet: off while a dropped frame is decoded again
        self.decoded = 0
        self.retries = 0             # needed frames decoded a second time, without skipping
        self._wanted: set[int] = set()   # pts ticks of the frames a sample needs
        self._frames = None          # the decoder's output iterator since the last seek
        self._last = None            # (pts ticks, upright RGB array) of the last frame decoded

    def _scan(self) -> tuple[list[int], list[int]]:
        """Presentation times (stream ticks, sorted) of all frames and of the keyframes."""
        ticks, keys, reordered = [], [], False
        for packet in self._container.demux(self._stream):
            t = packet.pts if packet.pts is not None else packet.dts
            if t is None or packet.size == 0:
                continue     # the demuxer's end-of-stream packet, or a packet without timestamps
            reordered = reordered or (bool(ticks) and t < ticks[-1])
            ticks.append(t)
            if packet.is_keyframe:
                keys.append(t)
        if self._stream.codec_context.has_b_frames and not reordered and len(ticks) > 2:
            # AVI stores decode order only: FFmpeg's frames come out in presentation order with the
            # timestamps of other frames, so a frame asked for by its time could be the wrong one.
            raise ValueError("the stream has B-frames but its container gives no presentation times "
                             "(AVI does not store them): PyAV cannot tell its frames apart")
        return sorted(ticks), sorted(keys)

    def will_need(self, indices) -> None:
        """The frames the caller will ask for: their packets are never skipped."""
        self._wanted.update(self._ticks[int(i)] for i in indices)

    def _decode_from_here(self):
        """Frames out of FFmpeg from the demuxer's position; unneeded packets go with NONREF."""
        context = self._stream.codec_context
        for packet in self._container.demux(self._stream):
            needed = not self._skipping or packet.pts is None or packet.pts in self._wanted
            mode = "DEFAULT" if needed else "NONREF"
            if context.skip_frame != mode:
                context.skip_frame = mode
            yield from context.decode(packet)

    def _seek(self, target: int) -> None:
        k = bisect.bisect_right(self._keys, target) - 1
        self._container.seek(self._keys[k] if k >= 0 else target, stream=self._stream,
                             backward=True, any_frame=False)
        self._frames = self._decode_from_here()

    def _seek_needed(self, target: int) -> bool:
        if self._frames is None or self._last is None or target < self._last[0]:
            return True
        k = bisect.bisect_right(self._keys, target) - 1
        return k >= 0 and self._keys[k] > self._last[0]   # a keyframe between here and the target

    def _next_at(self, target: int) -> tuple[np.ndarray | None, str]:
        """Decode forward to the frame at `target`: (its upright RGB, "") or (None, why it is not there)."""
        for frame in self._frames:
            self.decoded += 1
            if frame.pts is None or frame.pts < target:
                continue
            if frame.pts > target:
                return None, f"PyAV returned no frame at pts {target} (next: {frame.pts})"
            self._last = (target, upright(frame))
            return self._last[1], ""
        return None, f"the stream ended before the frame at pts {target}"

    def _frame_at(self, target: int) -> np.ndarray:
        if self._last is not None and self._last[0] == target:
            return self._last[1]
        if self._seek_needed(target):
            self._seek(target)
        rgb, why = self._next_at(target)
        if rgb is None and self.skip:      # dropped after all (e.g. announced too late): decode it in full
            self.retries += 1
            self._last, self._skipping = None, False
            self._seek(target)
            rgb, why = self._next_at(target)
            self._skipping = True
        if rgb is None:
            self._last = None
            raise RuntimeError(why)
        return rgb

    def get_batch(self, indices) -> np.ndarray:
        self.will_need(indices)
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
