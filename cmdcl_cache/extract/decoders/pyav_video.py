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

By position (`by_position` says why): where timestamps do not tell the frames apart (AVI stores decode
order only, and FFmpeg gives its frames, in display order, other frames' timestamps; MPEG-TS / PS seek by
bytes and land after the frame asked for; a frame rate finer than the time base gives two frames one
time), a sampled frame is found by counting: the file is decoded from its start, in order, nothing
skipped and no seek (a decoder outputs display order), frame k being the k-th frame out. After the last
sampled frame the rest is decoded and counted, so that a frame the decoder dropped or added fails the
video instead of shifting every frame after it. Slower (every frame decoded), never a wrong frame.
Keyframes-only sampling is refused there unless presentation times give the keyframes' positions.

Edit lists (`ffmpeg -ss ... -c copy` cuts): the packets FFmpeg flags discard are decoded (a frame shown
may be predicted from them) but never shown, so they are not frames of the video.

Threads: `threads` FFmpeg threads of its default kind (slices). The pool gives each worker cores / workers
threads, one where workers >= cores (the pipeline's usual setting), where no threading can help. Frame
threading (`thread_type = "AUTO"`) was measured with one worker and 2 threads on 2 cores and was no faster
(it delays every frame after a seek by a frame per thread), so it is not turned on (BENCHMARKS.md).

Frames come out upright: a display matrix (phone videos) is applied with np.rot90, counter-clockwise
as FFmpeg and PyAV's `VideoFrame.rotation` define it.
"""

from __future__ import annotations

import bisect
import os

import numpy as np

from cmdcl_cache.extract.decoders import BrokenFile

# Containers whose frames are told apart by position: AVI stores decode order only (FFmpeg gives its frames,
# in display order, the timestamps of other frames); MPEG-TS / PS seek by bytes, not to a keyframe's time.
BY_POSITION = {"avi": "AVI stores no presentation times", "mpegts": "MPEG-TS seeks by bytes",
               "mpeg": "MPEG-PS seeks by bytes"}


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
        self._ticks, self._keys, shown_keys, reordered = self._scan()
        self.num_frames = len(self._ticks)
        check_not_truncated(self.num_frames + self._discarded, stream.frames)   # the header counts both
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else float("nan")
        self._check_duration()
        self.by_position = self._position_reason(reordered)   # why frames are told apart by position
        # AVI's timestamps and keyframe flags are in decode order: its frames are at index / fps. A keyframe's
        # position is known only from presentation times the container shows to be such (reordered).
        avi = self._container.format.name == "avi"
        self._keys_known = reordered and not avi
        self.pts = None if avi else np.asarray(self._ticks, dtype=np.float64) * float(stream.time_base)
        self._key_indices = np.searchsorted(np.asarray(self._ticks), np.asarray(shown_keys, dtype=np.int64))
        self.skip = bool(skip)
        self._skipping = self.skip and not self.by_position   # read per packet: off while a frame is redone
        self.decoded = 0
        self.retries = 0             # needed frames decoded a second time, without skipping
        self._wanted: set[int] = set()   # pts ticks of the frames a sample needs
        self._final = -1             # by position: the last frame a sample needs
        self._frames = None          # the decoder's output iterator since the last seek
        self._last = None            # (pts ticks, or position, upright RGB array) of the last frame decoded
        self._position = 0           # by position: frames out of the decoder since the start

    def _scan(self) -> tuple[list[int], list[int], list[int], bool]:
        """Presentation times (stream ticks, sorted) of the frames shown, of the keyframes to seek to
        (discarded ones included) and of the keyframes shown; whether any frame was reordered."""
        ticks, keys, shown_keys, reordered = [], [], [], False
        self._discarded = 0
        for packet in self._container.demux(self._stream):
            t = packet.pts if packet.pts is not None else packet.dts
            if t is None or packet.size == 0:
                continue     # the demuxer's end-of-stream packet, or a packet without timestamps
            if packet.is_keyframe:
                keys.append(t)
            if packet.is_discard:
                self._discarded += 1
                continue     # before an edit list's start (`ffmpeg -ss -c copy`): decoded, never shown
            reordered = reordered or (bool(ticks) and t < ticks[-1])
            ticks.append(t)
            if packet.is_keyframe:
                shown_keys.append(t)
        return sorted(ticks), sorted(keys), sorted(shown_keys), reordered

    def _position_reason(self, reordered: bool) -> str:
        """Why this file is decoded by position ("" when its timestamps tell the frames apart): from its
        start, every frame, the k-th frame out being frame k (a decoder outputs display order)."""
        name = self._container.format.name
        if name in BY_POSITION:
            return BY_POSITION[name]
        if self._stream.codec_context.has_b_frames and not reordered and len(self._ticks) > 2:
            suffix = os.path.splitext(self._container.name)[1].lstrip(".").lower()
            shown = suffix if suffix in name.split(",") else name.split(",")[0]   # "mp4", not "mov,mp4,..."
            return f"the stream may have B-frames but this {shown} file gives no presentation times"
        if len(set(self._ticks)) < len(self._ticks):
            return "frames share a timestamp (a frame rate finer than the time base)"
        return ""

    def _check_duration(self) -> None:
        """A file cut short without a frame count in its header (mkv) reads as a shorter video: refuse it
        when its frames end more than 1 s and 5 % before the duration the header gives."""
        stream = self._stream
        if not self._ticks:
            return   # no frames: sampling says so
        if stream.duration:
            declared = float(stream.duration * stream.time_base)
        elif self._container.duration:
            declared = self._container.duration / 1e6
        else:
            return
        found = (self._ticks[-1] - self._ticks[0]) * float(stream.time_base)
        found += 1.0 / self.fps if self.fps > 0 else 0.0
        if declared - found > max(1.0, 0.05 * declared):
            raise BrokenFile(f"the file holds {found:.1f} of the {declared:.1f} seconds its header gives "
                             "(truncated?)")

    @property
    def key_indices(self) -> np.ndarray:
        if self.by_position and not self._keys_known:
            raise ValueError(f"keyframes-only sampling needs the keyframes' display positions, which this "
                             f"file does not give ({self.by_position}): sample by rate instead")
        return self._key_indices

    def will_need(self, indices) -> None:
        """The frames the caller will ask for: their packets are never skipped."""
        indices = [int(i) for i in indices]
        self._wanted.update(self._ticks[i] for i in indices)
        self._final = max([self._final, *indices])

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

    def _rewind(self) -> None:
        self._container.seek(0)   # the start of the file, in AV_TIME_BASE units
        self._frames, self._position, self._last = self._decode_from_here(), 0, None

    def _frame_by_position(self, i: int) -> np.ndarray:
        """Frame i: the (i+1)-th frame out of the decoder from the start of the file, nothing skipped."""
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        if self._frames is None or i < self._position:
            self._rewind()
        for frame in self._frames:
            self.decoded += 1
            self._position += 1
            if self._position - 1 == i:
                self._last = (i, upright(frame))
                if i == self._final:
                    self._check_complete()
                return self._last[1]
        raise RuntimeError(f"the stream ended after {self._position} of its {self.num_frames} frames")

    def _check_complete(self) -> None:
        """Decoded by position, a frame the decoder dropped or added would shift every later one: decode to
        the end and count."""
        for _ in self._frames:
            self.decoded += 1
            self._position += 1
        if self._position != self.num_frames:
            raise RuntimeError(f"decoded by position ({self.by_position}), the stream gave "
                               f"{self._position} frames for its {self.num_frames} packets")

    def get_batch(self, indices) -> np.ndarray:
        self.will_need(indices)
        if self.by_position:
            return np.stack([self._frame_by_position(int(i)) for i in indices])
        return np.stack([self._frame_at(self._ticks[int(i)]) for i in indices])

    def close(self) -> None:
        self._container.close()


def check_not_truncated(found: int, declared: int | None) -> None:
    """A file cut short keeps the header of the whole video (mp4 with its index at the front) and
    demuxes only the first part: fail it rather than cache a shorter video (no fallback)."""
    if declared and found < declared:
        raise BrokenFile(f"the file holds {found} of the {declared} frames its header lists (truncated?)")


def upright(frame) -> np.ndarray:
    """RGB array of a PyAV frame, with its display rotation (counter-clockwise degrees) applied."""
    rgb = frame.to_ndarray(format="rgb24")
    rotation = int(round(getattr(frame, "rotation", 0) or 0))
    if rotation % 90:
        raise ValueError(f"display rotation of {rotation} degrees: only multiples of 90 are supported")
    return np.rot90(rgb, (rotation // 90) % 4) if rotation % 360 else rgb
