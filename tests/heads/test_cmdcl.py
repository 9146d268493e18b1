"""CMDCL head: shapes, gradients, exact ablations, initial behaviour, explain maps."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from cmdcl_heads.models import make_head
from cmdcl_heads.config import HeadConfig
from cmdcl_heads.confounders import Confounders

D, C, CF, KP, KZ, B, T, P = 32, 5, 9, 6, 10, 3, 8, 4


def _conf(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Confounders(vp=torch.randn(KP, D, generator=g), vp_prior=torch.full((KP,), 1 / KP),
                       z=torch.randn(KZ, D, generator=g), z_prior=torch.rand(KZ, generator=g).softmax(0))


def _head(fine=True, **cfg):
    torch.manual_seed(0)
    cfg = HeadConfig(**{"layers": 1, "heads": 4, "dropout": 0.0, "max_frames": 32, **cfg})
    text = F.normalize(torch.randn(C, D), dim=-1)
    fine_text = F.normalize(torch.randn(CF, D), dim=-1) if fine else None
    return make_head(cfg, text, fine_text, _conf())


def _inputs(tokens=False):
    torch.manual_seed(1)
    frames = 5 * torch.randn(B, T, D)
    return frames, (torch.randn(B, T, P, D) if tokens else None)


@pytest.mark.parametrize("approximator", ["text", "dictionary"])
@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("fine", [False, True])
def test_shapes_and_explain(tokens, fine, approximator):
    head = _head(fine=fine, tokens_per_frame=P if tokens else 0, approximator=approximator).eval()
    frames, toks = _inputs(tokens)
    logits = head(frames, toks)
    assert logits.shape == (B, C) and torch.isfinite(logits).all()
    ex = head.explain(frames, toks)
    assert torch.allclose(ex["logits"], logits)
    assert ex["mediator"].shape == (B, T, CF if fine else C)
    assert ex["tci"].shape == (C, KP) and ex["tci_pred"].shape == (B, KP)
    # the approximator's weights: over T' (figure 4) or over the frame dictionary Z (after CATT), never both
    key = {"text": "approximator", "dictionary": "cross_sample"}[approximator]
    assert ex[key].shape == (B, T, C if approximator == "text" else KZ)
    assert ({"approximator", "cross_sample"} - {key}).isdisjoint(ex)
    for key in ("mediator", "tci", key):
        assert torch.allclose(ex[key].sum(-1), torch.ones(())), key
    assert torch.equal(ex["tci_pred"], ex["tci"][logits.argmax(-1)])


def test_grid_tokens_reach_the_logits():
    head = _head(tokens_per_frame=P).eval()
    frames, toks = _inputs(True)
    assert not torch.allclose(head(frames, toks), head(frames, torch.randn_like(toks)))
    with pytest.raises(ValueError, match="tokens per frame"):
        head(frames, toks[:, :, :2])


@pytest.mark.parametrize("tokens", [False, True])
def test_every_parameter_gets_gradient(tokens):
    head = _head(tokens_per_frame=P if tokens else 0)
    frames, toks = _inputs(tokens)
    y = torch.tensor([0, 1, 2])
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    zero_init = {"tci.out.weight", "mediator.v.weight", "fuse.weight"}
    for step in range(2):
        opt.zero_grad()
        F.cross_entropy(head(frames, toks), y).backward()
        names = [n for n, p in head.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        if step == 0:
            # zero-initialised output projections get gradient at once; what feeds them does from step 2
            assert not zero_init & set(names), names
        else:
            assert names == [], f"no gradient after one step: {names}"
        opt.step()
    assert {n for n, _ in head.named_parameters()} >= zero_init | {"text", "fine_text", "log_scale"}


def test_no_tci_gives_text_exactly():
    head = _head(tci=False).eval()
    assert head.tci is None and not any(n.startswith("tci") for n, _ in head.named_parameters())
    t_prime, tf_prime, attn = head.text_features()
    assert t_prime is head.text and torch.equal(t_prime, head.text) and attn is None
    assert torch.equal(tf_prime, head.fine_text)
    frames, _ = _inputs()
    v, _, _ = head.video_features(frames, None, tf_prime, t_prime)
    expected = head.logit_scale * F.normalize(v, dim=-1) @ F.normalize(head.text, dim=-1).T
    assert torch.equal(head(frames), expected)


def test_no_vci_gives_mean_of_encoder_output_exactly():
    head = _head(vci=False).eval()
    assert not hasattr(head, "mediator") and not hasattr(head, "cross") and not hasattr(head, "fine_text")
    frames, _ = _inputs()
    v, x, parts = head.video_features(frames, None, None)
    assert parts == {}
    assert torch.equal(v, head.encoder(F.normalize(frames, dim=-1)).mean(dim=1))
    assert torch.equal(v, x.mean(dim=1))


def test_switched_on_vci_differs_after_training_step_and_parts_switch_individually():
    frames, _ = _inputs()
    for flag, absent in [("mediator", "mediator"), ("cross_sample", "approx")]:
        head = _head(**{flag: False}).eval()
        assert not hasattr(head, absent)
        ex = head.explain(frames)
        assert flag not in ex and ex["logits"].shape == (B, C)
        assert flag != "cross_sample" or "approximator" not in ex
    # no confounders needed when nothing uses them
    cfg = HeadConfig(layers=0, tci=False, cross_sample=False, dropout=0.0)
    make_head(cfg, torch.randn(C, D), torch.randn(CF, D), None)(frames)
    with pytest.raises(ValueError, match="cmdcl-heads confounders build"):
        make_head(HeadConfig(layers=0), torch.randn(C, D), None, None)


def test_untrained_head_starts_at_zero_shot():
    # H = 0, every switch off: exactly zero-shot CLIP (mean of normalised frames vs the text ensemble)
    torch.manual_seed(0)
    text = F.normalize(torch.randn(C, D), dim=-1)
    frames = text[torch.tensor([0, 3, 1])][:, None] * 4 + 0.3 * torch.randn(B, T, D)
    off = make_head(HeadConfig(layers=0, tci=False, vci=False, dropout=0.0), text, None, None).eval()
    zs = 100 * F.normalize(F.normalize(frames, dim=-1).mean(1), dim=-1) @ text.T
    assert torch.allclose(off(frames), zs, atol=1e-4)
    # everything on: the zero-initialised branches leave the zero-shot decision in place
    on = make_head(HeadConfig(layers=0, dropout=0.0), text, F.normalize(torch.randn(CF, D), dim=-1),
                   _conf()).eval()
    assert torch.equal(on(frames).argmax(-1), torch.tensor([0, 3, 1]))
    assert torch.corrcoef(torch.stack([on(frames).flatten(), zs.flatten()]))[0, 1] > 0.95


def test_learn_text_false_freezes_tables():
    head = _head(learn_text=False)
    names = {n for n, _ in head.named_parameters()}
    assert "text" not in names and "fine_text" not in names
    assert head(*_inputs()).shape == (B, C)
    assert dataclasses.asdict(head.cfg)["learn_text"] is False


@pytest.mark.slow
def test_explain_plot_for_one_video(tmp_path):
    from cmdcl_heads.explain import centre_indices, explain_video, plot_explanation

    assert centre_indices(10, 5).tolist() == [1, 3, 5, 7, 9]
    assert centre_indices(2, 4).tolist() == [0, 0, 1, 1]
    head = _head(frames=T)
    maps, idx = explain_video(head, 3 * torch.randn(40, D).numpy())
    assert maps["mediator"].shape == (T, CF) and maps["tci"].shape == (C, KP) and len(idx) == T
    assert head.training  # left as it was
    out = plot_explanation(maps, [f"c{i}" for i in range(C)], [f"a{i}" for i in range(CF)], tmp_path / "x.png",
                           times=idx.astype(float), top_k=4, title="video v", truth="c1")
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 10_000
    off = _head(tci=False, cross_sample=False)
    maps, _ = explain_video(off, torch.randn(20, D).numpy())
    assert "tci" not in maps and "cross_sample" not in maps
    plot_explanation(maps, [f"c{i}" for i in range(C)], [f"a{i}" for i in range(CF)], tmp_path / "y.png")
