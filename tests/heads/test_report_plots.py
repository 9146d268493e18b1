"""The plots people read: whole class names and the split on the confusion matrix, no empty curves, the
probe's l2 search, and an explain figure whose k is the real one and whose title stays on the canvas."""

import numpy as np
import pytest

from cmdcl_heads import report
from cmdcl_heads.explain import explanation_figure

LONG = "attach the left rear wheel of the cartoon bicycle to its frame with four screws"


def assert_on_canvas(fig, artists):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for artist in artists:
        box = artist.get_window_extent(renderer)
        assert box.x0 >= -1 and box.y0 >= -1, (artist.get_text(), box)
        assert box.x1 <= fig.bbox.width + 1 and box.y1 <= fig.bbox.height + 1, (artist.get_text(), box)


def test_confusion_matrix_has_whole_wrapped_names_and_the_split():
    names = ["cartoon rabbit", LONG, "dog"]
    cm = np.array([[3, 1, 0], [0, 2, 0], [1, 0, 1]])
    fig = report.confusion_figure(cm, names, split="test")
    ax = fig.axes[0]
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        texts = [t.get_text() for t in labels]
        assert [" ".join(t.split()) for t in texts] == names            # nothing cut off
        assert all(len(line) <= report.WRAP_WIDTH for t in texts for line in t.split("\n"))
    assert "test split" in ax.get_title() and "8 videos" in ax.get_title()
    assert_on_canvas(fig, [ax.title, *ax.get_xticklabels(), *ax.get_yticklabels()])


@pytest.mark.slow
def test_many_classes_keep_whole_names_on_one_line(tmp_path):
    names = [f"class {i} {LONG}" for i in range(report.WRAP_CLASSES + 1)]
    cm = np.diag(np.arange(1, len(names) + 1))
    fig = report.confusion_figure(cm, names, split="val")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == names
    report.plot_confusion(cm, names, tmp_path / "c.png", split="val")
    assert (tmp_path / "c.png").stat().st_size > 0


def test_curves_are_not_drawn_without_a_trained_epoch(tmp_path):
    path = tmp_path / "curves.png"
    path.write_bytes(b"stale")
    zero_shot = [{"epoch": 0, "train_loss": None, "eval": {"split": "test", "top1": 0.25, "eval_loss": 1.4}}]
    assert report.plot_curves(zero_shot, "top1", path) is False and not path.exists()
    trained = [{"epoch": e, "train_loss": 1.0 / e, "eval": {"split": "test", "top1": 0.2 * e, "eval_loss": 1.0}}
               for e in (1, 2, 3)]
    assert report.plot_curves(trained, "top1", path, best_epoch=2) is True and path.stat().st_size > 0


def test_probe_sweep_plot_only_when_l2_was_searched(tmp_path):
    probe = {"l2": 1e-3, "chosen_on": "val", "fitted_on": ["train", "val"],
             "sweep": [{"l2": 10.0 ** -e, "val_metric": 0.5 + 0.05 * e, "val_loss": 1.0 / e} for e in range(1, 7)]}
    assert report.plot_probe_sweep(probe, "top1", tmp_path / "probe.png") is True
    assert (tmp_path / "probe.png").stat().st_size > 0
    no_val = {"l2": 1e-4, "chosen_on": "default", "fitted_on": ["train"], "sweep": []}
    assert report.plot_probe_sweep(no_val, "top1", tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists()


def _maps(classes, fine, steps=6, z=10, vp=7):
    rng = np.random.default_rng(0)

    def rows(n, k):
        w = rng.random((n, k))
        return w / w.sum(1, keepdims=True)

    return {"logits": rng.standard_normal(classes), "mediator": rows(steps, fine), "cross_sample": rows(steps, z),
            "tci_pred": rows(1, vp)[0]}


@pytest.mark.parametrize("classes,fine", [(3, 2), (12, 30)])
def test_explain_panels_name_the_real_k_and_the_title_stays_on_the_canvas(classes, fine):
    title = "a video id " + "very long " * 30 + "(demo, best.pt)"
    fig, suptitle = explanation_figure(_maps(classes, fine), [f"class {i}" for i in range(classes)],
                                       [f"action {i}" for i in range(fine)], times=np.arange(6) * 0.5, top_k=8,
                                       title=title, truth="class 1")
    titles = [ax.get_title() for ax in fig.axes]
    k = min(5, classes)
    assert any(t.startswith(f"top-{k} of {classes} classes") for t in titles), titles
    assert any(f"top-{min(8, fine)} atomic actions" in t for t in titles), titles
    assert not any("top-5" in t for t in titles) or classes > 5
    assert " ".join(suptitle.get_text().split()) == " ".join(title.split())   # wrapped, not cut
    assert_on_canvas(fig, [suptitle])
    bars = fig.axes[1].get_yticklabels()
    assert len(bars) == k


@pytest.mark.slow
def test_a_name_too_long_for_the_layout_grows_the_png_instead_of_being_cut(tmp_path):
    import matplotlib.image as mpimg
    name = "x" * 400   # no space to wrap at: 400 characters on one line
    path = tmp_path / "ap.png"
    report.plot_per_class_ap(np.array([0.5, 0.7]), ["dog", name], path, split="test")
    fig = report.pyplot().figure()
    width = fig.text(0, 0, name, fontsize=8).get_window_extent(fig.canvas.get_renderer()).width
    report.pyplot().close(fig)
    assert mpimg.imread(path).shape[1] > width   # the whole name (and the bars beside it) is in the image
    report.plot_confusion(np.eye(2, dtype=int), ["dog", name], tmp_path / "cm.png", split="test")
    assert mpimg.imread(tmp_path / "cm.png").shape[0] > width * 0.9   # rotated x labels: the height grows
