"""TensorBoard events in every run folder, read back with TensorBoard's own reader; curves.png after every epoch."""

import json

import pytest

from _heads_synth import make_synthetic
from cmdcl_heads import report
from cmdcl_heads.config import HeadConfig, TrainConfig
from cmdcl_heads.train import train


@pytest.fixture(scope="module")
def synth_val(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("tb_synth"), train_per_class=6, test_per_class=3, val_per_class=2)


def _opts(synth, out, **kw):
    cache, manifest = synth
    base = dict(cache=str(cache), dataset=str(manifest), out=str(out), epochs=3, batch_size=16, lr=3e-3,
                warmup=0.5, device="cpu", quiet=True, data_mode="memory", eval_each_epoch=True)
    return TrainConfig(**{**base, **kw})


def _head(model="text4vis"):
    return HeadConfig(model=model, frames=4, layers=1, heads=4)


def _events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _plugin_scalars(run, tag):
    """What `tensorboard --load_fast=false` shows: the plugin reader, scalars stored as tensors."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    return [(e.step, float(make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_every_epoch_scalar_the_hparams_and_the_confusion_image_are_in_the_events(synth_val, tmp_path):
    run = tmp_path / "run"
    summary = train(_opts(synth_val, run), _head())
    acc = _events(run)
    records = _records(run)
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "loss/val", "loss/test", "top1/val", "top1/test", "top5/val", "lr",
            "time/epoch_seconds", "final/test/top1"} <= tags
    for tag, value in (("loss/train", lambda r: r["train_loss"]), ("top1/val", lambda r: r["select"]["top1"]),
                       ("loss/test", lambda r: r["eval"]["eval_loss"]), ("lr", lambda r: r["lr"])):
        got = _scalars(acc, tag)
        assert [s for s, _ in got] == [1, 2, 3], tag
        assert [v for _, v in got] == pytest.approx([value(r) for r in records], rel=1e-6), tag
    assert _scalars(acc, "final/test/top1") == [(summary["best_epoch"], pytest.approx(summary["metrics"]["top1"]))]
    image = acc.Images("confusion/test")[0]
    assert image.encoded_image_string == (run / "confusion.png").read_bytes() and image.step == summary["best_epoch"]
    # the HParams tab: the run's options with the final metrics
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = acc.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lr"].number_value == pytest.approx(3e-3) and start.hparams["model"].string_value == "text4vis"
    assert start.hparams["eval_each_epoch"].string_value == "true"
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert "final/test/top1" in {m.name.tag for m in experiment.metric_infos}


@pytest.mark.slow
def test_a_resumed_run_shows_each_epoch_once_with_the_values_of_metrics_jsonl(synth_val, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "cut"

    def stop_after_two(epoch, record):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_opts(synth_val, run), _head(), on_epoch_end=stop_after_two)
    # a run killed after logging epoch 3 but before writing its checkpoint left this behind
    with SummaryWriter(str(run)) as stale:
        stale.add_scalar("loss/train", 999.0, 3)
    with open(run / "metrics.jsonl", "a") as fh:   # and an append the kill cut short
        fh.write('{"epoch": 3, "train_lo')
    train(_opts(synth_val, run, resume=True), _head())
    acc = _events(run)
    records = _records(run)
    got = _scalars(acc, "loss/train")
    assert [s for s, _ in got] == [1, 2, 3] and 999.0 not in [v for _, v in got]
    assert [v for _, v in got] == pytest.approx([r["train_loss"] for r in records], rel=1e-6)
    assert [s for s, _ in _scalars(acc, "top1/val")] == [1, 2, 3]
    assert [s for s, _ in _plugin_scalars(run, "loss/train")] == [1, 2, 3]


@pytest.mark.slow
def test_an_epoch_logged_before_a_kill_shows_once_after_the_first_resume(synth_val, tmp_path, monkeypatch):
    from cmdcl_heads.events import RunEvents

    run = tmp_path / "killed"
    logged = RunEvents.epoch

    def killed_after_events(self, record):   # epoch 2's events are flushed, its checkpoint never written
        logged(self, record)
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunEvents, "epoch", killed_after_events)
    with pytest.raises(KeyboardInterrupt):
        train(_opts(synth_val, run, epochs=4), _head())
    monkeypatch.setattr(RunEvents, "epoch", logged)
    train(_opts(synth_val, run, epochs=4, resume=True), _head())
    records = _records(run)
    for got in (_plugin_scalars(run, "loss/train"), _scalars(_events(run), "loss/train")):
        assert [s for s, _ in got] == [1, 2, 3, 4]
        assert [v for _, v in got] == pytest.approx([r["train_loss"] for r in records], rel=1e-6)


@pytest.mark.slow
def test_a_new_run_in_a_failed_starts_folder_drops_its_events(synth_val, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "again"
    with SummaryWriter(str(run)) as stale:   # a start that failed before its first checkpoint
        stale.add_scalar("loss/train", 999.0, 1)
    train(_opts(synth_val, run, epochs=1), _head())
    assert 999.0 not in [v for _, v in _scalars(_events(run), "loss/train")]


def test_zero_shot_runs_log_the_final_metrics_and_no_epoch(synth_val, tmp_path):
    run = tmp_path / "zs"
    summary = train(_opts(synth_val, run), _head("zeroshot"))
    acc = _events(run)
    assert "loss/train" not in acc.Tags()["scalars"]
    assert _scalars(acc, "final/test/top1") == [(0, pytest.approx(summary["metrics"]["top1"]))]


@pytest.mark.slow
def test_curves_are_rewritten_after_every_epoch_and_have_no_empty_panel(synth_val, tmp_path, monkeypatch):
    panels = []
    save = report.save_png

    def counting(fig, path, dpi=100):
        if path.name == "curves.png":
            panels.append([bool(ax.lines) for ax in fig.axes])
        save(fig, path, dpi)

    monkeypatch.setattr(report, "save_png", counting)
    seen = []
    run = tmp_path / "curves"
    train(_opts(synth_val, run, select_split="none", eval_each_epoch=False),
          _head(), on_epoch_end=lambda epoch, record: seen.append((run / "curves.png").read_bytes()))
    assert len(seen) == 3 and len(set(seen)) == 3              # a new picture after each epoch
    assert panels and all(p == [True] for p in panels)          # no split per epoch: the loss panel alone
    panels.clear()
    train(_opts(synth_val, tmp_path / "with_val", epochs=2), _head())
    assert panels and all(p == [True, True] for p in panels)
