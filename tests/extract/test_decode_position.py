"""Containers whose timestamps do not tell the frames apart (AVI with B-frames, MPEG-TS / PS, a frame rate
finer than the time base) are decoded by position; edit lists and truncated mkv files. Every frame carries
its own index in 8 black / white blocks, so a test checks each returned frame is the source frame asked for."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from cmdcl_cache.extract.decode import DecodeError, decode_video, resolve_decoder
from cmdcl_cache.extract.decoders.decord_video import DecordVideo
from cmdcl_cache.extract.decoders.pyav_video import PyAVVideo
from cmdcl_cache.cache.sampling import SamplingPolicy

W, H, BLOCK = 96, 64, 12
RATES = [SamplingPolicy(fps=1), SamplingPolicy(fps=8), SamplingPolicy(num_frames=7)]


def _numbered(i: int) -> np.ndarray:
    """A frame showing i in binary (top row of blocks) over moving texture (so B-frames are used)."""
    img = np.roll(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8), 3 * i, axis=1)
    for bit in range(8):
        img[:BLOCK, bit * BLOCK:(bit + 1) * BLOCK] = 255 if (i >> bit) & 1 else 0
    return img


def _index_of(frame: np.ndarray) -> int:
    return sum(1 << bit for bit in range(8) if frame[2:BLOCK - 2, bit * BLOCK + 2:(bit + 1) * BLOCK - 2].mean() > 128)


def write_numbered(path: Path, frames: int, codec: str = "libx264", options=None, rate=25, tick=None) -> Path:
    import av
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, options=options or {})
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        if tick:
            stream.codec_context.time_base = tick
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_numbered(i), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


H264_B = {"bf": "3", "g": "30", "keyint_min": "30", "sc_threshold": "0"}
FILES = {   # name: (frames, codec, options): B-frames in containers without usable presentation times
    "h264_b.avi": (120, "libx264", H264_B),
    "mpeg4_b.avi": (120, "mpeg4", {"bf": "2", "g": "30"}),
    "h264_b.ts": (120, "libx264", H264_B),
    "mpeg2_b.mpg": (120, "mpeg2video", {"bf": "2", "g": "15"}),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return {name: write_numbered(root / name, n, codec, opts) for name, (n, codec, opts) in FILES.items()}


def _decoded(path, policy, opener="pyav", fallback="decord"):
    """(backend, sampled indices, index each returned frame shows) of a decode as the pipeline runs it."""
    msgs = list(decode_video(resolve_decoder(opener), str(path), policy,
                             fallback=resolve_decoder(fallback) if fallback else None))
    frames = np.concatenate([m[2] for m in msgs if m[0] == "frames"])
    return msgs[0][6], [int(i) for i in msgs[0][4]], [_index_of(f) for f in frames]


@pytest.mark.parametrize("name", FILES)
def test_the_default_decodes_b_frames_without_timestamps_by_position_frame_exact(hostile, name):
    assert PyAVVideo(str(hostile[name])).by_position
    for policy in RATES:
        backend, index, shown = _decoded(hostile[name], policy)
        assert backend == "pyav" and shown == index, (policy, index, shown)


@pytest.mark.parametrize("name", ["h264_b.avi", "mpeg4_b.avi", "mpeg2_b.mpg"])
def test_decord_decodes_such_files_in_order_and_refuses_their_keyframes(hostile, name):
    """decord seeking on them returned other frames than asked for: it decodes every frame in order."""
    video = DecordVideo(str(hostile[name]))
    assert video.sequential
    for policy in RATES:
        _, index, shown = _decoded(hostile[name], policy, "decord", None)
        assert shown == index
    assert [_index_of(f) for f in video.get_batch([90, 3, 3, 40])] == [90, 3, 3, 40]   # backwards: rewinds
    with pytest.raises(ValueError, match="keyframes-only"):
        video.key_indices


def test_keyframes_only_is_refused_where_no_keyframe_is_known_by_position(hostile):
    with pytest.raises(DecodeError, match="keyframes-only"):
        _decoded(hostile["h264_b.avi"], SamplingPolicy(fps=1, keyframes_only=True))


def test_decord_refuses_mpeg_ts(hostile):
    with pytest.raises(ValueError, match="MPEG-TS"):
        DecordVideo(str(hostile["h264_b.ts"]))


def test_b_frames_muxed_without_presentation_times_are_told_apart_by_position(hostile, tmp_path):
    """An AVI's packets remuxed into mp4 as they are (presentation time = decode time): the refusal used
    to name AVI; now PyAV decodes the file by position, naming its real container."""
    import av
    path = tmp_path / "no_pts.mp4"
    with av.open(str(hostile["h264_b.avi"])) as inp, av.open(str(path), "w") as out:
        s_in = inp.streams.video[0]
        s_out = out.add_stream_from_template(s_in)
        for packet in inp.demux(s_in):
            if packet.dts is not None:
                packet.pts, packet.stream = packet.dts, s_out
                out.mux(packet)
    reason = PyAVVideo(str(path)).by_position
    assert "this mp4 file gives no presentation times" in reason and "AVI" not in reason
    _, index, shown = _decoded(path, SamplingPolicy(fps=8))
    assert shown == index


def test_frames_that_share_a_timestamp_are_told_apart_by_position(tmp_path):
    """1500 fps in a millisecond time base (mkv): two frames per tick."""
    path = write_numbered(tmp_path / "hifps.mkv", 120, options={"bf": "3"}, rate=1500)
    video = PyAVVideo(str(path))
    assert "share a timestamp" in video.by_position
    _, index, shown = _decoded(path, SamplingPolicy(num_frames=20))
    assert shown == index and len(set(index)) == 20


def _cut(src: Path, path: Path, frames: int) -> Path:
    """What `ffmpeg -ss ... -c copy` writes: the packets from the keyframe before the cut, the first
    `frames` at negative times, which the mp4 muxer turns into an edit list (FFmpeg flags them discard)."""
    import av
    with av.open(str(src)) as inp, av.open(str(path), "w") as out:
        s_in = inp.streams.video[0]
        s_out = out.add_stream_from_template(s_in)
        shift = round(Fraction(frames, 25) / s_in.time_base)
        for packet in inp.demux(s_in):
            if packet.dts is None:
                continue
            packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, s_out
            out.mux(packet)
    return path


def test_frames_an_edit_list_discards_are_not_frames_of_the_video(tmp_path):
    cut = _cut(write_numbered(tmp_path / "src.mp4", 100, options=H264_B), tmp_path / "cut.mp4", 7)
    video = PyAVVideo(str(cut))
    assert video.num_frames == 93 and video.pts[0] == 0 and not video.by_position
    for policy in [*RATES, SamplingPolicy(num_frames=93)]:
        backend, index, shown = _decoded(cut, policy)
        assert backend == "pyav" and shown == [7 + i for i in index]


def test_an_mkv_cut_short_is_refused_rather_than_cached_as_a_shorter_video(tmp_path):
    """mkv lists no frame count, but its header keeps the whole video's duration."""
    path = write_numbered(tmp_path / "full.mkv", 150, options=H264_B)
    data = path.read_bytes()
    short = tmp_path / "short.mkv"
    short.write_bytes(data[: len(data) // 2])
    assert PyAVVideo(str(path)).num_frames == 150
    with pytest.raises(ValueError, match=r"holds \d\.\d of the 6\.0 seconds"):
        PyAVVideo(str(short))
    with pytest.raises(DecodeError, match="truncated") as err:   # decord, the fallback, is not tried
        _decoded(short, SamplingPolicy(fps=1))
    assert err.value.stage == "open" and "fallback" not in str(err.value)
