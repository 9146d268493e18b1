"""CMDCL variants (*ours*, HeadConfig.mediator_mode): shapes, each switch changes the computation as stated,
--no-vci still gives V' = mean_t X exactly, class-mean V_P builds on the confounded benchmark's format."""

import pytest
import torch
import torch.nn.functional as F

from cmdcl_heads.models import make_head
from cmdcl_heads.config import HeadConfig
from test_cmdcl import B, C, CF, D, KP, KZ, P, T, _conf, _head, _inputs


@pytest.mark.parametrize("mode", ["gate", "replace", "project"])
@pytest.mark.parametrize("tokens", [False, True])
def test_modes_shapes_and_gradients(mode, tokens):
    head = _head(mediator_mode=mode, tokens_per_frame=P if tokens else 0)
    frames, toks = _inputs(tokens)
    logits = head(frames, toks)
    assert logits.shape == (B, C) and torch.isfinite(logits).all()
    ex = head.eval().explain(frames, toks)
    assert ("mediator" in ex) == (mode != "project")
    if mode != "project":
        assert ex["mediator"].shape == (B, T, CF)
    head.train()
    F.cross_entropy(head(frames, toks), torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is not None for p in head.parameters())


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="mediator_mode"):
        HeadConfig(mediator_mode="swap")


def test_replace_makes_the_video_feature_the_mediator_output():
    gate, rep = _head(mediator_mode="gate").eval(), _head(mediator_mode="replace").eval()
    frames, _ = _inputs()
    assert torch.equal(rep.mediator.v.weight, torch.eye(D))  # identity values: M = S T'_f at init
    assert torch.count_nonzero(gate.mediator.v.weight) == 0
    assert not torch.allclose(gate(frames), rep(frames))
    # with the cross-sample term off, V' = mean_t LN(M) and M = S T'_f lies in span(T'_f)
    head = _head(mediator_mode="replace", cross_sample=False).eval()
    t_prime, tf_prime, _ = head.text_features()
    x = head.encoder(F.normalize(frames, dim=-1))
    m, s = head.mediator(x, tf_prime)
    assert torch.allclose(m, s @ tf_prime, atol=1e-5)
    v, _, _ = head.video_features(frames, None, tf_prime, t_prime)
    assert torch.allclose(v, head.out_ln(m).mean(1), atol=1e-6)


def test_project_removes_what_the_fine_texts_do_not_span():
    head = _head(mediator_mode="project").eval()
    assert not hasattr(head, "mediator") and not hasattr(head, "fine_text")
    proj = head.fine_projector
    assert proj.shape == (D, D) and torch.linalg.matrix_rank(proj) == CF
    assert torch.allclose(proj @ proj, proj, atol=1e-5) and torch.allclose(proj, proj.T, atol=1e-6)
    frames, _ = _inputs()
    # a component orthogonal to span(E_f) (a "scene") does not change the logits at all
    scene = torch.randn(D)
    scene = scene - proj @ scene
    normed = F.normalize(frames, dim=-1)
    assert torch.allclose(head(normed), head(normed + 3 * scene), atol=2e-3)  # logits are x100
    gate = _head(mediator_mode="gate").eval()
    assert not torch.allclose(gate(normed), gate(normed + 3 * scene), atol=1e-2)


@pytest.mark.parametrize("mode", ["replace", "project"])
def test_no_vci_ignores_the_mode_exactly(mode):
    head = _head(vci=False, mediator_mode=mode).eval()
    assert not hasattr(head, "mediator") and not hasattr(head, "fine_projector")
    frames, _ = _inputs()
    v, x, parts = head.video_features(frames, None, None)
    assert parts == {} and torch.equal(v, x.mean(dim=1))
    assert torch.equal(v, head.encoder(F.normalize(frames, dim=-1)).mean(dim=1))


def test_class_mean_vp_on_the_confounded_benchmark(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from confounded import SCMConfig, build_dictionaries, class_mean_copy, write_benchmark

    from cmdcl_heads.confounders import FILE_NAME, Confounders

    cfg = SCMConfig(dim=16, activities=4, actions=6, steps=2, order_pairs=1, frames=8, train_per_class=3,
                    test_per_class=1)
    paths = write_benchmark(tmp_path, cfg)
    cm = class_mean_copy(paths)

    class Args:
        kp, kz = 4, 4

    build_dictionaries(cm, paths["manifest"], Args, prototypes="class-mean")
    build_dictionaries(paths["full"], paths["manifest"], Args)
    conf = Confounders.load(cm / FILE_NAME)
    # one prototype per atomic action used by some script, labelled by its fine (action) key
    assert conf.vp_labels and all(k.startswith("a") for k in conf.vp_labels)
    assert conf.vp.shape[0] == len(conf.vp_labels) <= cfg.actions
    assert not torch.allclose(conf.vp[:4], Confounders.load(paths["full"] / FILE_NAME).vp[:4])


@pytest.mark.slow
def test_backdoor_cross_sample_averages_scores_over_z_strata():
    frames, _ = _inputs()
    head = _head(cross_sample_mode="backdoor", approximator="dictionary").eval()
    assert not hasattr(head, "cross") and head.fuse.weight.shape == (D, 2 * D)
    t_prime, tf_prime, _ = head.text_features()
    v, x, parts = head.video_features(frames, None, tf_prime, t_prime)
    assert v.shape == (B, KZ, D) and "cross_sample" not in parts
    # zero-initialised Wf: every stratum gives the same V'_z, equal to cross_sample=False
    off = _head(cross_sample=False).eval()
    assert torch.allclose(head(frames), off(frames), atol=1e-4)
    # once Wf is non-zero the strata differ and the logits are their prior-weighted mean
    with torch.no_grad():
        head.fuse.weight.normal_(0, 0.3)
    v, _, _ = head.video_features(frames, None, tf_prime, t_prime)
    assert not torch.allclose(v[:, 0], v[:, 1])
    per_z = head.logit_scale * F.normalize(v, dim=-1) @ F.normalize(t_prime, dim=-1).T
    prior = _conf().z_prior / _conf().z_prior.sum()
    assert torch.allclose(head(frames), (per_z * prior[None, :, None]).sum(1), atol=1e-4)
    assert not torch.allclose(head(frames), off(frames), atol=1e-2)
    with pytest.raises(ValueError, match="cross_sample_mode"):
        HeadConfig(cross_sample_mode="nwgm")
    with pytest.raises(ValueError, match="add --approximator dictionary"):   # backdoor strata are Z's
        HeadConfig(cross_sample_mode="backdoor")


def test_project_warns_when_the_fine_texts_span_everything():
    cfg = HeadConfig(layers=0, tci=False, cross_sample=False, dropout=0.0, mediator_mode="project")
    with pytest.warns(UserWarning, match="projection is the identity"):
        make_head(cfg, torch.randn(C, D), torch.randn(D + 3, D), None)
