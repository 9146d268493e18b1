"""TensorBoard event files of a run: `tensorboard --logdir runs` shows every run folder as one run.

Per epoch (the step is the epoch): `loss/train`, `loss/<split>` and `<metric>/<split>` for each split
evaluated that epoch (the selection split; the eval split with --eval-each-epoch), `lr` (at the epoch's
end), `time/epoch_seconds`, `skipped_steps`. At the end: the eval split's metrics of best under
`final/<split>/<metric>`, the run's options in the HParams tab with those metrics, and the confusion matrix
(or per-class AP) image, the same PNG as in the run folder.

A resumed run opens a new event file in the same folder with `purge_step` = the first epoch it trains:
TensorBoard then hides what an earlier file logged at that epoch or later (an interrupted run can log an
epoch whose checkpoint was never written), so every epoch is shown once, with the values metrics.jsonl holds. A fresh run opens its file with `purge_step` = 0:
the SessionLog START that writes is what TensorBoard's plugin reader (`--load_fast=false`) purges on, and
without one in the first file it showed an epoch logged before a kill twice after the first resume.
"""

from __future__ import annotations

import struct
from pathlib import Path

PER_EPOCH_KEYS = ("lr", "skipped_steps")


class RunEvents:
    """A SummaryWriter on a run folder; `with RunEvents(...)`: flushed and closed however the run ends."""

    def __init__(self, folder: str | Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    def __enter__(self) -> "RunEvents":
        return self

    def __exit__(self, *exc) -> None:
        self.writer.close()

    def epoch(self, record: dict) -> None:
        """The scalars of one metrics.jsonl record, flushed so that a running TensorBoard sees them now."""
        step = record["epoch"]
        for tag, value in epoch_scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def final(self, split: str, metrics: dict, best_epoch: int, options: dict, figure: Path | None) -> None:
        """The eval split's metrics of best, the options in the HParams tab, the confusion (or AP) PNG."""
        from torch.utils.tensorboard.summary import hparams

        finals = {f"final/{split}/{k}": float(v) for k, v in metrics.items() if _is_number(v)}
        for piece in hparams(hparam_values(options), finals):   # experiment, session start, session end
            self.writer.file_writer.add_summary(piece)
        for tag, value in finals.items():
            self.writer.add_scalar(tag, value, best_epoch)
        if figure is not None and figure.exists():
            self.writer.file_writer.add_summary(png_summary(f"{figure.stem}/{split}", figure.read_bytes()), best_epoch)
        self.writer.flush()


def epoch_scalars(record: dict) -> dict[str, float]:
    """{tag: value} of one epoch record (cmdcl_heads/train.py): metric-first tags, so that TensorBoard draws
    the splits of one metric in one chart."""
    out = {}
    if _is_number(record.get("train_loss")):
        out["loss/train"] = float(record["train_loss"])
    for part in ("select", "eval"):
        r = record.get(part)
        if not r:
            continue
        for key, value in r.items():
            if key != "split" and _is_number(value):
                out[f"{'loss' if key == 'eval_loss' else key}/{r['split']}"] = float(value)
    for key in PER_EPOCH_KEYS:
        if _is_number(record.get(key)):
            out[key] = float(record[key])
    if _is_number(record.get("epoch_seconds")):
        out["time/epoch_seconds"] = float(record["epoch_seconds"])
    return out


def hparam_values(options: dict) -> dict:
    """Flat scalar options for the HParams tab: numbers and strings as they are; booleans as "true"/"false"
    (torch's writer would make them 1.0/0.0), None and lists as their text."""
    out = {}
    for key, value in options.items():
        if isinstance(value, bool):
            out[key] = str(value).lower()
        else:
            out[key] = value if isinstance(value, (int, float, str)) else str(value)
    return out


def png_summary(tag: str, png: bytes):
    """An image Summary of PNG bytes as they are (no decode and re-encode); the size is read from IHDR."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    width, height = struct.unpack(">II", png[16:24])
    image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
