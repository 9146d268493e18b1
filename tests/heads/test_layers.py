import pytest
import torch

from cmdcl_heads.config import HeadConfig
from cmdcl_heads.layers import TemporalEncoder


def test_temporal_encoder_shapes_frames_and_grid():
    torch.manual_seed(0)
    enc = TemporalEncoder(dim=16, layers=2, heads=4, max_frames=32, dropout=0.0, tokens_per_frame=4)
    frames, tokens = torch.randn(3, 8, 16), torch.randn(3, 8, 4, 16)
    assert enc(frames, tokens).shape == (3, 8, 16)
    enc_f = TemporalEncoder(dim=16, layers=2, heads=4, max_frames=32, dropout=0.0)
    out = enc_f(frames)
    assert out.shape == (3, 8, 16)
    out.sum().backward()
    assert all(p.grad is not None for p in enc_f.parameters())


def test_grid_tokens_change_the_output():
    torch.manual_seed(0)
    enc = TemporalEncoder(dim=16, layers=1, heads=4, max_frames=32, dropout=0.0, tokens_per_frame=4)
    frames = torch.randn(2, 5, 16)
    a = enc(frames, torch.randn(2, 5, 4, 16))
    b = enc(frames, torch.randn(2, 5, 4, 16))
    assert not torch.allclose(a, b)


def test_head_config_rejects_unknown_keys():
    cfg = HeadConfig.from_dict({"model": "linear", "frames": 8})
    assert cfg.frames == 8 and HeadConfig.from_dict(cfg.to_dict()) == cfg
    try:
        HeadConfig.from_dict({"layerz": 3})
    except ValueError as err:
        assert "layerz" in str(err)
    else:
        raise AssertionError("unknown key accepted")


def test_encoder_refuses_grid_tokens_it_was_not_built_for():
    enc = TemporalEncoder(dim=16, layers=1, heads=4, max_frames=32, dropout=0.0)
    with pytest.raises(ValueError, match="built for frame features only"):
        enc(torch.randn(2, 8, 16), torch.randn(2, 8, 4, 16))
    enc = TemporalEncoder(dim=16, layers=1, heads=4, max_frames=32, dropout=0.0, tokens_per_frame=4)
    with pytest.raises(ValueError, match="9 grid tokens per frame given, but the encoder was built for 4"):
        enc(torch.randn(2, 8, 16), torch.randn(2, 8, 9, 16))


def test_cosine_logits_stay_fp32_under_bf16_autocast():
    """The classifier's scale-100 cosines are computed in fp32 even inside autocast (bf16 would be ~0.1 off)."""
    from cmdcl_heads.models import cosine_logits

    torch.manual_seed(0)
    video, text = torch.randn(4, 512), torch.randn(180, 512)
    exact = cosine_logits(100.0, video, text)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = cosine_logits(100.0, video, text)
        naive = 100.0 * torch.nn.functional.normalize(video, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    assert inside.dtype == torch.float32 and torch.equal(inside, exact)
    assert naive.dtype == torch.bfloat16 and (naive.float() - exact).abs().max() > 1e-3
