"""The end of a training: `best` evaluated once on the eval split, and what the run folder and the terminal
get from it: summary.json (the metrics, how best was selected, timings, skipped steps), the plots, the final
TensorBoard events and the metrics table, with a warning on stderr when training steps were skipped.
"""

from __future__ import annotations

import math

import numpy as np

from . import report
from .config import HeadConfig, TrainConfig
from .data import RunData
from .errors import TrainingError
from .evaluate import evaluate_logits, predict_logits
from .events import RunEvents
from .metrics import per_class_ap, primary_metric
from .prepare import Splits, dataset_ref
from .run import RunFolder


def finish(run: RunFolder, config: TrainConfig, head: HeadConfig, data: RunData, model, splits: Splits, device,
           trainable_params: int, requested: str, probe: dict | None = None, events: RunEvents | None = None) -> dict:
    """Evaluate the eval split once, with best; write the plots, summary.json, the final events and the table."""
    from cmdcl_cache.progress import console

    best = run.load_checkpoint("best")
    model.load_state_dict(best.model)
    name, videos, feats = splits.eval
    logits = predict_logits(model, feats, config.batch_size, device, config.precision)
    metrics = evaluate_logits(logits, videos)
    if not math.isfinite(metrics["eval_loss"]):
        raise TrainingError(f"training collapsed: best (epoch {best.meta['epoch']}) gives a non-finite loss on "
                            f"{name} ({metrics['eval_loss']}); lower --lr (now {config.lr:g})")
    history = run.read_metrics()
    metric = primary_metric(data.labels.multi_label)
    select = splits.select[0] if splits.select and not probe else None   # the probe's val chose l2, not an epoch
    at_best = next((r for r in history if r["epoch"] == best.meta["epoch"]), {})
    selection = {"split": select, "metric": metric if select else None, "best_epoch": best.meta["epoch"],
                 "value": best.meta["best_value"] if select else None, "requested": requested,
                 "metrics": {k: v for k, v in at_best.get("select", {}).items() if k != "split"} if select else None}
    epoch_times = [r["epoch_seconds"] for r in history if r.get("epoch_seconds") is not None]
    summary = {
        "model": head.model, "dataset": dataset_ref(config.dataset), "label_set": data.labels.label_set,
        "split": name, "split_scheme": config.split_scheme, "checkpoint": "best", "best_epoch": best.meta["epoch"],
        "selection": selection, "primary_metric": metric, "metrics": metrics,
        "num_eval_videos": len(videos.video_ids), "skipped_missing": splits.skipped(),
        "epochs": config.epochs if trainable_params else 0, "data_mode": feats.mode, "device": str(device),
        "trainable_parameters": trainable_params, **({"reweighting": splits.reweighting} if splits.reweighting else {}),
        "mean_epoch_seconds": float(np.mean(epoch_times)) if epoch_times else None,
        "skipped_steps": sum(r.get("skipped_steps") or 0 for r in history),
        "head_config": head.to_dict(), "train_config": config.to_dict(), "cache_dir": str(data.folder.path.resolve()),
    }
    report.write_outputs(run.path, logits, videos, data.labels.names, metric, history,
                         best.meta["epoch"] if select else None, trained=bool(trainable_params), split_name=name)
    if data.labels.multi_label:
        ap = per_class_ap(logits, videos.targets)
        summary["per_class_ap"] = {n: (None if np.isnan(v) else float(v)) for n, v in zip(data.labels.names, ap)}
    if probe:
        summary.update(probe=probe, trainable_parameters=probe["parameters"])
        report.plot_probe_sweep(probe, metric, run.path / "probe.png")
    run.write_summary(summary)
    if events is not None:
        events.final(name, metrics, best.meta["epoch"], {**config.to_dict(), **head.to_dict()},
                     run.path / ("per_class_ap.png" if data.labels.multi_label else "confusion.png"))
    how = _caption(best.meta["epoch"], select, metric, trainable_params, config.select_split, probe)
    rows = {f"{name}, best": metrics}
    if select:
        rows[f"{select} (selection), best"] = selection["metrics"]
    out = console(quiet=config.quiet)
    out.print(report.metrics_table(f"{head.model} on {data.manifest.dataset}/{data.labels.label_set}: {name} "
                                   "metrics", rows, caption=how))
    out.print(f"run folder: {run}", markup=False)
    if summary["skipped_steps"]:   # on stderr, --quiet or not: these metrics come from a damaged training
        epochs = [r["epoch"] for r in history if r.get("skipped_steps")]
        console(stderr=True).print(f"warning: {summary['skipped_steps']} training step(s) were skipped for a "
                                   f"non-finite loss or gradient (epochs {', '.join(map(str, epochs))}; "
                                   "metrics.jsonl); lower --lr", markup=False)
    return summary


def _caption(epoch: int, select: str | None, metric: str, trainable_params: int, select_option: str,
             probe: dict | None) -> str:
    """How the reported checkpoint was chosen, in one line under the table."""
    if probe:
        return f"fitted by L-BFGS (l2 {probe['l2']:g} chosen on {probe['chosen_on']}; see summary.json 'probe')"
    if select:
        return f"best = epoch {epoch}, selected by {select} {metric}"
    if not trainable_params:
        return f"best = last epoch {epoch} (nothing trained)"
    why = "none" if select_option == "none" else "auto found no val videos"
    return f"best = last epoch {epoch} (no selection split: --select-split {why})"
