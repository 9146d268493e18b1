"""Training, resume, eval / predict and the CLI on a small synthetic cache where the label is learnable."""

import json
import tomllib  # noqa: F401  (the CLI needs Python >= 3.11)

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _heads_synth import NUM_TASKS, make_synthetic
from cmdcl_cache.cache.folder import Cache
from cmdcl_cache.ingest.synthetic import write_synthetic_cache
from cmdcl_cache.errors import CacheError, ProvenanceError
from cmdcl_cache.cache.format import read_texts
from cmdcl_heads import train as train_module
from cmdcl_heads.cli import app
from cmdcl_heads.config import HeadConfig, TrainConfig
from cmdcl_heads.data import NonFiniteFeatures
from cmdcl_heads.evaluate import CheckpointMismatch, evaluate_run
from cmdcl_heads.run import CheckpointError, RunFolder
from cmdcl_heads.train import TrainingError, train

CHANCE = 1 / NUM_TASKS
TIMING = ("epoch_seconds", "eval_seconds")


@pytest.fixture(scope="module")
def synth_val(tmp_path_factory):
    """The same train and test videos plus 3 val videos per class."""
    return make_synthetic(tmp_path_factory.mktemp("synth_val"), val_per_class=3)


def _opts(synth, out, **kw):
    cache, manifest = synth
    base = dict(cache=str(cache), dataset=str(manifest), out=str(out), epochs=4, batch_size=16, lr=3e-3,
                warmup=0.5, device="cpu", quiet=True, data_mode="memory", eval_each_epoch=True)
    return TrainConfig(**{**base, **kw})


def _ckpt(run, name="best"):
    """A checkpoint as one dict: its metadata, "model" (the state dict) and "optimizer" when it has one."""
    c = RunFolder(run).load_checkpoint(name)
    return {**c.meta, "model": c.model, **({"optimizer": c.optimizer} if c.optimizer is not None else {})}


def _cfg(model, **kw):
    return HeadConfig(**{"model": model, "frames": 8, "layers": 1, "heads": 4, **kw})


def _records(run):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _metrics(record, part):
    """The metrics of one split ("select" or "eval") of a metrics.jsonl record, without its name."""
    return {k: v for k, v in record[part].items() if k != "split"}


def test_zeroshot_evaluates_without_training(synth, tmp_path):
    run = tmp_path / "zs"
    summary = train(_opts(synth, run), _cfg("zeroshot"))
    assert summary["metrics"]["top1"] > CHANCE + 0.4
    assert summary["trainable_parameters"] == 0 and summary["epochs"] == 0
    records = _records(run)
    assert len(records) == 1 and records[0]["epoch"] == 0 and records[0]["train_loss"] is None
    assert "eval" not in records[0] and "select" not in records[0]   # the eval split is evaluated once, at the end
    assert summary["selection"]["split"] is None and summary["best_epoch"] == 0
    ckpt = _ckpt(run, "best")
    assert "optimizer" not in ckpt and set(ckpt["model"]) == {"text"}
    for name in ("summary.json", "confusion.png", "last.safetensors", "config.toml", "metrics.csv"):
        assert (run / name).stat().st_size > 0
    assert not (run / "curves.png").exists()   # nothing was trained: no curve to draw
    assert evaluate_run(run, quiet=True) == summary["metrics"]


@pytest.mark.slow
@pytest.mark.parametrize("model,lr", [("text4vis", 3e-3)])   # linear is fitted by L-BFGS: tests/heads/test_probe.py
def test_trained_baselines_beat_chance(synth, tmp_path, model, lr):
    run = tmp_path / model
    summary = train(_opts(synth, run, epochs=6, lr=lr), _cfg(model))
    assert summary["metrics"]["top1"] > CHANCE + 0.4, summary["metrics"]
    assert summary["trainable_parameters"] > 0 and summary["data_mode"] == "memory"
    records = _records(run)
    assert [r["epoch"] for r in records] == list(range(1, 7))
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    # no val videos: nothing selects, best.pt is the last epoch (never the best test epoch)
    assert summary["selection"]["split"] is None and summary["best_epoch"] == 6
    assert summary["metrics"] == _metrics(records[-1], "eval")
    for name in ("curves.png", "confusion.png", "best.safetensors", "last.safetensors"):
        assert (run / name).exists()


@pytest.mark.slow
def test_multi_label_uses_bce_and_map(synth, tmp_path):
    run = tmp_path / "steps"
    summary = train(_opts(synth, run, label_set="steps", lr=3e-2, epochs=5), _cfg("linear"))
    assert summary["primary_metric"] == "mAP"
    # chance mAP is about the positive rate (~0.28)
    assert summary["metrics"]["mAP"] > 0.55
    assert (run / "per_class_ap.png").exists() and not (run / "confusion.png").exists()
    assert len(summary["per_class_ap"]) == 10


@pytest.mark.slow
def test_grid_tokens_reach_the_temporal_encoder(tmp_path):
    synth = make_synthetic(tmp_path, grid=2, train_per_class=4, test_per_class=2)
    run = tmp_path / "grid"
    summary = train(_opts(synth, run, epochs=1), _cfg("text4vis"))
    ckpt = _ckpt(run, "last")
    assert ckpt["tokens"] is True and "encoder.space_pos" in ckpt["model"]
    assert evaluate_run(run, quiet=True) == summary["metrics"]


@pytest.mark.slow  # ~3 s alone, up to ~40 s on a loaded 2-core machine
@pytest.mark.parametrize("data", ["synth", "synth_val"])  # without and with a selection split
def test_resume_gives_the_same_final_metrics(data, request, tmp_path):
    synth = request.getfixturevalue(data)
    full = tmp_path / "full"
    ref = train(_opts(synth, full), _cfg("text4vis"))

    cut = tmp_path / "cut"

    def stop_after_two(epoch, record):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_opts(synth, cut), _cfg("text4vis"), on_epoch_end=stop_after_two)
    assert len(_records(cut)) == 2
    with pytest.raises(CheckpointError, match="--resume"):
        train(_opts(synth, cut), _cfg("text4vis"))
    resumed = train(_opts(synth, cut, resume=True, data_mode="lazy", workers=0), _cfg("text4vis"))
    assert _records(cut) == _records(full)
    assert resumed["metrics"] == ref["metrics"]
    assert resumed["selection"] == ref["selection"]
    assert resumed["selection"]["split"] == (None if data == "synth" else "val")
    a = _ckpt(full, "last")["model"]
    b = _ckpt(cut, "last")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointMismatch, match="'lr'"):
        train(_opts(synth, tmp_path / "cut", resume=True, lr=1.0, epochs=6), _cfg("text4vis"))


@pytest.mark.slow  # DataLoader workers are forked for every pass
def test_memory_and_lazy_modes_give_the_same_metrics(synth, tmp_path):
    a = train(_opts(synth, tmp_path / "mem", epochs=2), _cfg("text4vis"))
    b = train(_opts(synth, tmp_path / "lazy", epochs=2, data_mode="lazy", workers=2), _cfg("text4vis"))
    assert a["data_mode"] == "memory" and b["data_mode"] == "lazy"
    assert _records(tmp_path / "mem") == _records(tmp_path / "lazy")
    assert a["metrics"] == b["metrics"]


@pytest.mark.slow
def test_cli_train_eval_predict(synth, tmp_path):
    cache, manifest = synth
    run = tmp_path / "cli"
    config = tmp_path / "run.toml"
    # TOML keys mirror the flags; --epochs on the command line wins over the file
    config.write_text(f'cache = "{cache}"\ndataset = "{manifest}"\nmodel = "linear"\nlr = 0.03\n'
                      f'epochs = 5\nbatch-size = 16\nframes = 8\ndevice = "cpu"\nquiet = true\n')
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--config", str(config), "--epochs", "3", "--out", str(run)])
    assert res.exit_code == 0, res.output
    ckpt = _ckpt(run, "last")
    assert ckpt["train_config"]["epochs"] == 3 and ckpt["train_config"]["lr"] == 0.03
    assert ckpt["head_config"]["model"] == "linear" and ckpt["train_config"]["batch_size"] == 16
    summary = json.loads((run / "summary.json").read_text())

    out = tmp_path / "eval.json"
    res = runner.invoke(app, ["eval", "--run", str(run), "--device", "cpu", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text()) == summary["metrics"]  # eval reproduces summary.json exactly
    assert "top1" in res.output

    preds = tmp_path / "preds.jsonl"
    res = runner.invoke(app, ["predict", "--run", str(run), "--out", str(preds), "--top-k", "3", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(lines) == 30 and lines[0]["video_id"] == "test_0_000" and lines[0]["target"] == "t0"
    top = lines[0]["top_k"]
    assert len(top) == 3 and top[0]["key"] == f"t{top[0]['id']}" and top[0]["name"].startswith("task number")
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    top1 = np.mean([line["top_k"][0]["key"] == line["target"] for line in lines])
    assert top1 == pytest.approx(summary["metrics"]["top1"])

    config.write_text('learning_rate = 0.1\n')
    res = runner.invoke(app, ["train", "--config", str(config), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "learning_rate" in res.output


@pytest.mark.slow
def test_best_checkpoint_is_selected_on_val_never_on_test(synth_val, tmp_path, monkeypatch):
    # scripted val top-1 peaks at epoch 2; the test metrics of the later epochs must not matter
    script = iter([0.3, 0.9, 0.5, 0.6])
    real = train_module.evaluate_logits

    def scripted(logits, split):
        out = real(logits, split)
        if split.video_ids[0].startswith("val_"):
            out["top1"] = next(script)
        return out

    monkeypatch.setattr(train_module, "evaluate_logits", scripted)
    run = tmp_path / "sel"
    summary = train(_opts(synth_val, run, epochs=4, lr=3e-2), _cfg("text4vis", layers=0))
    monkeypatch.undo()
    records = _records(run)
    assert [(r["select"]["split"], r["eval"]["split"]) for r in records] == [("val", "test")] * 4
    assert [r["select"]["top1"] for r in records] == [0.3, 0.9, 0.5, 0.6]
    assert summary["selection"] == {"split": "val", "metric": "top1", "best_epoch": 2, "value": 0.9,
                                    "requested": "auto", "metrics": _metrics(records[1], "select")}
    assert summary["best_epoch"] == 2 and _ckpt(run, "best")["epoch"] == 2
    assert summary["metrics"] == _metrics(records[1], "eval")     # test metrics of the val-selected epoch
    assert evaluate_run(run, checkpoint="last", quiet=True) == _metrics(records[3], "eval")
    assert summary["skipped_missing"] == {"eval": 0, "train": 0, "select": 0}
    assert evaluate_run(run, quiet=True) == summary["metrics"]
    on_val = evaluate_run(run, split="val", quiet=True)   # all but the scripted top1 are reproduced
    assert {k: v for k, v in on_val.items() if k != "top1"} == {
        k: v for k, v in summary["selection"]["metrics"].items() if k != "top1"}


@pytest.mark.slow
def test_multi_label_selection_is_the_argmax_of_val_map(synth_val, tmp_path):
    run = tmp_path / "steps"
    summary = train(_opts(synth_val, run, label_set="steps", lr=3e-2, epochs=4), _cfg("text4vis", layers=0))
    records = _records(run)
    val_map = [r["select"]["mAP"] for r in records]
    assert summary["selection"]["split"] == "val" and summary["selection"]["metric"] == "mAP"
    assert summary["best_epoch"] == 1 + int(np.argmax(val_map))   # first epoch of the highest val mAP
    assert summary["selection"]["value"] == max(val_map)
    assert summary["metrics"] == _metrics(records[summary["best_epoch"] - 1], "eval")


@pytest.mark.slow
def test_without_selection_split_best_is_last(synth, synth_val, tmp_path):
    runs = {"no-val": (synth, {}), "none": (synth_val, {"select_split": "none"}),
            "eval-on-val": (synth_val, {"eval_split": "val"})}   # auto never selects on the eval split
    for name, (data, kw) in runs.items():
        run = tmp_path / name
        summary = train(_opts(data, run, epochs=2, lr=3e-2, **kw), _cfg("text4vis", layers=0))
        assert summary["selection"] == {"split": None, "metric": None, "best_epoch": 2, "value": None,
                                        "requested": kw.get("select_split", "auto"), "metrics": None}, name
        best = _ckpt(run, "best")
        last = _ckpt(run, "last")
        assert best["epoch"] == last["epoch"] == 2 and best["train_config"]["select_split"] == "none"
        assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
        records = _records(run)
        assert all("select" not in r for r in records)
        assert summary["metrics"] == _metrics(records[-1], "eval")
        assert evaluate_run(run, checkpoint="last", quiet=True) == summary["metrics"]


def test_selection_on_the_eval_split_is_refused(synth_val, tmp_path):
    run = tmp_path / "refused"
    with pytest.raises(TrainingError, match="--select-split test is also the --eval-split"):
        train(_opts(synth_val, run, select_split="test"), _cfg("linear"))
    with pytest.raises(TrainingError, match="--select-split val is also the --eval-split"):
        train(_opts(synth_val, run, select_split="val", eval_split="val"), _cfg("linear"))
    with pytest.raises(ValueError, match="unknown split 'dev'; this manifest declares train, val, test"):
        train(_opts(synth_val, run, select_split="dev"), _cfg("linear"))
    assert not run.exists()   # refused before anything was written
    config = tmp_path / "run.toml"
    config.write_text('select-split = "test"\n')   # the TOML key mirrors the flag
    res = CliRunner().invoke(app, ["train", "--cache", str(synth_val[0]), "--dataset", str(synth_val[1]),
                                   "--model", "linear", "--out", str(run), "--device", "cpu", "--quiet",
                                   "--config", str(config)])
    assert res.exit_code == 2 and "selects the model on its own evaluation data" in res.output
    assert "--select-split none" in res.output and not run.exists()


def test_cmdcl_without_confounders_names_the_command(synth, tmp_path):
    res = CliRunner().invoke(app, ["train", "--cache", str(synth[0]), "--dataset", str(synth[1]), "--model",
                                   "cmdcl", "--out", str(tmp_path / "c"), "--device", "cpu", "--quiet"])
    assert res.exit_code == 2
    assert "cmdcl-heads confounders build --cache" in res.output and "--dataset" in res.output


@pytest.mark.slow
def test_checkpoint_and_cache_mismatches_name_the_attribute(synth, tmp_path):
    run = tmp_path / "run"
    train(_opts(synth, run, epochs=1), _cfg("linear"))
    other_dim = make_synthetic(tmp_path / "dim", dim=16)
    with pytest.raises(CheckpointMismatch, match="'feature_dim'.*32.*16|feature dimension is 32 .* 16"):
        evaluate_run(run, cache=str(other_dim[0]), quiet=True)
    other_model = make_synthetic(tmp_path / "prov", provenance={"model": "ViT-L-14"})
    with pytest.raises(ProvenanceError, match="attribute 'model'"):
        evaluate_run(run, cache=str(other_model[0]), quiet=True)
    renamed = make_synthetic(tmp_path / "names", task_names=[f"other {c}" for c in range(NUM_TASKS)])
    with pytest.raises(CheckpointMismatch, match="'label_names'.*'task number 0' vs 'other 0'"):
        evaluate_run(run, cache=str(renamed[0]), dataset=str(renamed[1]), quiet=True)
    # texts.h5 written for another labels.json
    with pytest.raises(CacheError, match="texts.h5: label set 'task' has other names than .*labels.json"):
        train(_opts((renamed[0], synth[1]), tmp_path / "t"), _cfg("linear"))


@pytest.mark.parametrize("split,mode", [("train", "memory"), ("test", "memory"), ("test", "lazy")])
def test_nan_features_in_any_split_read_are_refused_naming_the_video(synth, tmp_path, split, mode):
    cache = Cache(synth[0])
    feats = {v: np.asarray(cache.features(v)) for v in cache.video_ids}
    vid = f"{split}_3_004"
    feats[vid][2] = np.nan
    bad = write_synthetic_cache(tmp_path / "bad", feats, read_texts(synth[0] / "texts.h5"))
    with pytest.raises(NonFiniteFeatures, match=rf"video '{vid}' has NaN/Inf in 1 of its \d+ cached features rows"):
        train(_opts((bad, synth[1]), tmp_path / "nan", data_mode=mode, workers=0), _cfg("linear"))
    assert not (tmp_path / "nan" / "best.safetensors").exists()


@pytest.mark.slow
def test_steps_with_a_non_finite_gradient_are_skipped_then_stop(synth, tmp_path, monkeypatch):
    real = train_module.grad_norms
    calls = {"n": 0}

    def norm_inf_on_first_two(params):
        calls["n"] += 1
        total, per = real(params)
        return (torch.tensor(float("inf")), per) if calls["n"] <= 2 else (total, per)

    monkeypatch.setattr(train_module, "grad_norms", norm_inf_on_first_two)
    run = tmp_path / "skip"
    train(_opts(synth, run, epochs=2), _cfg("text4vis", layers=0))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [2, 0]
    assert all(np.isfinite(r["train_loss"]) for r in records)

    monkeypatch.setattr(train_module, "grad_norms", lambda params: (torch.tensor(float("nan")), real(params)[1]))
    monkeypatch.setattr(train_module, "MAX_BAD_STEPS", 3)
    with pytest.raises(TrainingError, match=r"\d+ steps in a row had a non-finite loss or gradient"):
        train(_opts(synth, tmp_path / "stop", epochs=2), _cfg("text4vis", layers=0))


@pytest.mark.slow
def test_a_skipped_step_names_the_parameters_with_a_non_finite_gradient(synth, tmp_path, monkeypatch):
    """A NaN planted in one parameter's gradient on the first step: that step is skipped, metrics.jsonl names
    exactly that parameter, and training goes on with finite weights."""
    target = "encoder.blocks.0.mlp.fc.weight"
    real_build = train_module.build_head

    def build_with_one_bad_gradient(*args, **kwargs):
        model = real_build(*args, **kwargs)
        calls = {"n": 0}

        def nan_once(grad):
            calls["n"] += 1
            return grad * float("nan") if calls["n"] == 1 else grad

        dict(model.named_parameters())[target].register_hook(nan_once)
        return model

    monkeypatch.setattr(train_module, "build_head", build_with_one_bad_gradient)
    run = tmp_path / "named"
    train(_opts(synth, run, epochs=2), _cfg("text4vis"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [1, 0]
    assert records[0]["nonfinite_grads"] == {"step": 1, "params": [target]}
    assert "nonfinite_grads" not in records[1]
    weights = _ckpt(run, "last")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_texts_of_other_weights_are_refused(synth, tmp_path):
    """texts.h5 from another model's weights has the same D: without the check, zero-shot would be silently
    wrong."""
    from cmdcl_cache.cache.format import texts_provenance, write_texts

    cache = Cache(synth[0])
    feats = {v: np.asarray(cache.features(v)) for v in cache.video_ids}
    texts = read_texts(synth[0] / "texts.h5")
    other = write_synthetic_cache(tmp_path / "other", feats, texts)
    write_texts(other / "texts.h5", texts, {**texts_provenance(other / "texts.h5"), "pretrained": "laion2b"})
    with pytest.raises(ProvenanceError, match="attribute 'pretrained'"):
        train(_opts((other, synth[1]), tmp_path / "run"), _cfg("zeroshot"))


def test_checkpoint_with_another_fine_vocabulary_is_refused(synth, tmp_path):
    run = tmp_path / "fine"
    train(_opts(synth, run, epochs=1), _cfg("linear"))
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    path = run / "best.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["cmdcl"])
    assert meta["fine_label_names"]
    meta["fine_label_names"] = list(reversed(meta["fine_label_names"]))
    save_file(load_file(str(path)), str(path), metadata={"cmdcl": json.dumps(meta)})
    with pytest.raises(CheckpointMismatch, match="attribute 'fine_label_names'"):
        evaluate_run(run, quiet=True)


def test_non_finite_gradients_are_described_by_model_part():
    names = ["encoder.proj.weight", "encoder.blocks.0.time.attn.in_proj_weight", "encoder.blocks.0.mlp.fc.bias",
             "encoder.blocks.3.time.ln.weight", "tci.attn.q.weight"]
    model = torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(4)))   # only its 8 tensors are counted
    assert train_module.describe_bad(names, model) == (
        "non-finite in 5 of 8 parameter tensors: encoder.proj, encoder.blocks.0, encoder.blocks.3, tci")
    assert "norm overflowed" in train_module.describe_bad([], model)


def test_training_on_cuda_leaves_cudnn_attention_out_unless_asked():
    """The kernel choice is a global switch that sdpa_kernel sets and restores; on CPU nothing changes."""
    from torch.backends import cuda

    before = (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled())
    with train_module._attention_kernels(torch.device("cuda"), allow_cudnn=False):
        assert not cuda.cudnn_sdp_enabled()
        assert cuda.flash_sdp_enabled() and cuda.mem_efficient_sdp_enabled() and cuda.math_sdp_enabled()
    assert (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled()) == before
    for device, allow in ((torch.device("cuda"), True), (torch.device("cpu"), False)):
        with train_module._attention_kernels(device, allow_cudnn=allow):
            assert (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled()) == before
