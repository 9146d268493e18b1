"""The run folder contract: what `train` writes and `eval`, `predict`, `explain`, `train --resume` read.

    runs/<name>/
        config.toml          the resolved head and training configuration; `--config` repeats the run
        best.safetensors     weights of the selected epoch + metadata (configs, labels, cache provenance)
        last.safetensors     the same for the last epoch, plus optimizer, scheduler and RNG states (resume)
        metrics.jsonl        one record per epoch; metrics.csv: the same, flat, for a spreadsheet
        summary.json         the eval split's metrics of best, the selection, timings (written last: a run
                             without it is unfinished, and `train --resume` finishes it)
        curves.png           rewritten after every epoch; confusion.png | per_class_ap.png at the end
        events.out.tfevents.*  TensorBoard event files (cmdcl_heads/events.py): `tensorboard --logdir runs`
        train.lock           flock of the `train` writing the folder (store.WriterLock); left behind

Checkpoints are safetensors files: tensors and a JSON metadata string, nothing else. Loading one parses
JSON and reads raw tensor bytes; no pickle is involved anywhere, so a checkpoint from a stranger cannot
run code. A `.pt` file (the pickle format of cmdcl 0.1, or anyone's `torch.save`) is never opened: the
reader refuses it by name. Every file is written to a temporary name and renamed into place.

A checkpoint belongs to its folder: `eval`, `predict`, `explain` and `--resume` refuse one that disagrees with
the folder's other checkpoint or its config.toml (RunFolder.foreign), so a best.safetensors copied in from
another run is never reported as this run's. Metrics files are strict JSON: NaN and inf are written null.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import stat
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from cmdcl_cache.config import ConfigError, read_toml, to_toml
from cmdcl_cache import WriterLock, write_atomic

CHECKPOINT_VERSION = 2
METRICS_FILE = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.toml"
SUFFIX = ".safetensors"
EVENTS_GLOB = "events.out.tfevents.*"
PLOTS = ("curves.png", "confusion.png", "per_class_ap.png", "probe.png")
LOCK_FILE = "train.lock"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, not a cmdcl safetensors file, or another version."""


@dataclass
class Checkpoint:
    meta: dict                       # configs, labels, provenance, epoch, best_epoch, best_value
    model: dict                      # state dict
    optimizer: dict | None = None    # last only
    scheduler: dict | None = None
    rng: dict | None = None


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock: WriterLock | None = None
        self.metrics_note = ""   # what read_metrics skipped

    def __str__(self) -> str:
        return str(self.path)

    def checkpoint_path(self, name: str) -> Path:
        return self.path / f"{name}{SUFFIX}"

    @property
    def has_run(self) -> bool:
        return self.checkpoint_path("last").exists()

    @property
    def finished(self) -> bool:
        """summary.json is the last file a run writes."""
        return (self.path / SUMMARY_FILE).exists()

    def claim(self, create: bool) -> None:
        """Hold the folder's exclusive lock until release(): a second writer exits 2 naming this process. A
        folder to resume must exist already (`create` False): a mistyped --out starts nothing."""
        if not create and not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no run folder here to resume (is --out the folder `cmdcl-heads "
                                  "train` wrote?)")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = WriterLock(self.path / LOCK_FILE, f"the run folder {self.path}", "train")

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def start_fresh(self) -> None:
        """A new run: the folder must not hold one; stale metrics and checkpoints of a failed start go."""
        if self.has_run:
            raise CheckpointError(f"{self.path}: already holds a run (last{SUFFIX}); pass --resume to continue "
                                  "it or choose another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        for name in (METRICS_FILE, METRICS_CSV, SUMMARY_FILE, f"best{SUFFIX}"):
            (self.path / name).unlink(missing_ok=True)
        for events in self.path.glob(EVENTS_GLOB):   # TensorBoard would draw them as part of the new run
            events.unlink()

    # ------------------------------------------------------------------------------------ configuration

    def write_config(self, head, train) -> Path:
        path = self.path / CONFIG_FILE
        text = ("# The resolved configuration of this run; `cmdcl-heads train --config " + str(path)
                + " --out OTHER` repeats it.\n" + config_toml(head, train))
        write_atomic(path, text.encode())
        return path

    def config_problem(self) -> str | None:
        """Why config.toml cannot speak for this run folder, or None: train writes it in every run folder, so
        a folder without one is no run; a name that is no regular file (a link to /dev/zero) is never read."""
        path = self.path / CONFIG_FILE
        if not path.exists() and not path.is_symlink():
            return (f"{path}: missing; `cmdcl-heads train` writes it in every run folder, so {self.path} is not "
                    "a run folder (or it was damaged)")
        if not path.exists() or not stat.S_ISREG(path.stat().st_mode):
            return f"{path}: not a regular file (a FIFO, device or dangling link); a run's config.toml is a file"
        return None

    def read_config(self) -> dict:
        """config.toml as {"train": {...}, "head": {...}}, the options as train resolved them."""

        path = self.path / CONFIG_FILE
        problem = self.config_problem()
        if problem:
            raise CheckpointError(problem)
        table = read_toml(path)
        return {"train": dict(table.get("train", {})), "head": dict(table.get("head", {}))}

    # -------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, name: str, meta: dict, model: torch.nn.Module, optimizer=None, scheduler=None,
                        with_rng: bool = False) -> Path:
        from safetensors.torch import save

        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        extra = {}
        if optimizer is not None:
            opt_tensors, extra["optimizer"] = _split_optimizer(optimizer.state_dict())
            tensors.update(opt_tensors)
        if scheduler is not None:
            extra["scheduler"] = scheduler.state_dict()
        if with_rng:
            rng_tensors, extra["rng"] = _rng_state()
            tensors.update(rng_tensors)
        tensors = _unshared({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        header = {"cmdcl": json.dumps({**meta, "version": CHECKPOINT_VERSION, **extra}, allow_nan=True)}
        path = self.checkpoint_path(name)
        write_atomic(path, save(tensors, metadata=header))
        return path

    def load_checkpoint(self, name: str) -> Checkpoint:
        """Read `name`.safetensors; refuse anything else (a pickle `.pt` is never opened)."""
        path = self.checkpoint_path(name)
        if not path.exists():
            legacy = self.path / f"{name}.pt"
            if legacy.exists():
                raise CheckpointError(f"{legacy}: a pickle checkpoint (cmdcl 0.1 or torch.save); cmdcl reads only "
                                      f"{SUFFIX} checkpoints and never unpickles a file, so nothing was loaded; "
                                      "retrain with this version")
            raise CheckpointError(f"{path}: no checkpoint here (is {self.path} a run folder written by "
                                  "`cmdcl-heads train`?)")
        tensors, meta = _read_safetensors(path)
        if meta.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"{path}: checkpoint version {meta.get('version')!r}, this cmdcl reads "
                                  f"{CHECKPOINT_VERSION}")
        missing = [key for key in REQUIRED_META if key not in meta]
        if missing:
            raise CheckpointError(f"{path}: its metadata lacks {', '.join(map(repr, missing))} (what cmdcl writes in "
                                  "every checkpoint); nothing was loaded")
        model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        bad = [k for k, v in model.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"{path}: weights {', '.join(bad[:3])} hold NaN/Inf; nothing was loaded")
        try:   # the metadata is data: every structure is checked, a surprise is a refusal, not a traceback
            optimizer = _join_optimizer(tensors, meta["optimizer"]) if "optimizer" in meta else None
            rng = {"tensors": {k: v for k, v in tensors.items() if k.startswith("rng.")}, **meta["rng"]} \
                if "rng" in meta else None
            scheduler = meta.get("scheduler")
            if scheduler is not None and not isinstance(scheduler, dict):
                raise TypeError("scheduler state is not an object")
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise CheckpointError(f"{path}: its metadata is not what cmdcl writes ({type(err).__name__}: {err}); "
                                  "nothing was loaded") from None
        return Checkpoint(meta=meta, model=model, optimizer=optimizer, scheduler=scheduler, rng=rng)

    def foreign(self, name: str, meta: dict) -> str | None:
        """What shows that checkpoint `name` (metadata `meta`) is not this run's, or None: the other
        checkpoint (best / last) was trained on other data or with another head, or config.toml holds other
        options. A checkpoint copied in from another run (8 classes into a 4-class run, D=256 into D=512)
        would otherwise be used as this run's. Options a resume may change (RESUME_FREE) are not compared."""
        from .config import RESUME_FREE, HeadConfig, TrainConfig

        other = self.checkpoint_path("last" if name == "best" else "best")
        if other.is_file():
            theirs = _read_meta(other)
            for key in SAME_IN_A_RUN:
                mine, its = meta.get(key), theirs.get(key)
                if mine != its:
                    if isinstance(mine, dict) and isinstance(its, dict):   # name the entry, not the whole dict
                        sub = next(k for k in sorted(set(mine) | set(its)) if mine.get(k) != its.get(k))
                        key, mine, its = f"{key}.{sub}", mine.get(sub), its.get(sub)
                    return f"attribute '{key}' is {_brief(mine)}, in {other.name} {_brief(its)}"
        config = self.path / CONFIG_FILE
        if not config.is_file():
            return None
        try:
            table = read_toml(config)
            written = {**HeadConfig.from_dict(table.get("head", {})).to_dict(),
                       **TrainConfig.from_dict(table.get("train", {})).to_dict()}
        except (ConfigError, ValueError, TypeError) as err:
            return f"{config} does not read as this run's configuration ({err})"
        for key, value in {**_public(HeadConfig.from_dict(meta["head_config"])),
                           **_public(TrainConfig.from_dict(meta["train_config"]))}.items():
            if key not in RESUME_FREE and written.get(key) != value:
                return f"option '{key}' is {value!r}, in {config.name} {written.get(key)!r}"
        return None

    # ------------------------------------------------------------------------------------------ metrics

    def append_metrics(self, record: dict) -> None:
        path = self.path / METRICS_FILE
        try:
            with open(path, "a") as fh:
                fh.write(_metrics_line(record))
        except OSError as err:   # a full disk: name the file (the error alone names none)
            raise OSError(err.errno, err.strerror, str(path)) from None
        self._write_csv()

    def read_metrics(self) -> list[dict]:
        """The epoch records. A last line cut short (a kill mid-append: no newline, no JSON) is skipped and
        `metrics_note` says so; any other line that is no epoch record is refused, naming file and line."""
        path = self.path / METRICS_FILE
        self.metrics_note = ""
        if not path.exists():
            return []
        text = path.read_text(errors="replace")
        lines = text.splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                if number == len(lines) and not text.endswith("\n"):
                    self.metrics_note = f"{path}: line {number} is cut short (a kill mid-write?); skipped"
                    break
                raise CheckpointError(f"{path}: line {number} is not JSON ({err})") from None
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise CheckpointError(f"{path}: line {number} is no epoch record (a JSON object with an 'epoch')")
            records.append(record)
        return records

    def truncate_metrics(self, last_epoch: int) -> None:
        """Keep the records of epochs <= last_epoch (a resumed run rewrites the epochs after its checkpoint)."""
        kept = [r for r in self.read_metrics() if r["epoch"] <= last_epoch]
        write_atomic(self.path / METRICS_FILE, "".join(map(_metrics_line, kept)).encode())
        self._write_csv()

    def _write_csv(self) -> None:
        rows = [_flat(r) for r in self.read_metrics()]
        columns = list(dict.fromkeys(k for r in rows for k in r))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.path / METRICS_CSV, out.getvalue().encode())

    def read_summary(self) -> dict | None:
        """summary.json, written last by a run that finished; None while the run is unfinished. A file that is
        not what `train` writes (no JSON object with the eval split and its metrics) is refused, naming it."""
        path = self.path / SUMMARY_FILE
        if not path.exists():
            return None
        try:
            summary = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: not JSON ({err})") from None
        if not isinstance(summary, dict):
            raise CheckpointError(f"{path}: holds a JSON {type(summary).__name__}, not the object `train` writes")
        wrong = [k for k, kind in (("split", str), ("metrics", dict)) if not isinstance(summary.get(k), kind)]
        if not isinstance(summary.get("selection") or {}, dict):
            wrong.append("selection")
        if wrong:
            raise CheckpointError(f"{path}: no valid {', '.join(map(repr, wrong))} (not the summary `train` "
                                  "writes)")
        return summary

    def plot(self, name: str) -> Path | None:
        """One of the PNGs `train` writes (PLOTS), None where this run has none."""
        path = self.path / name
        return path if path.is_file() else None

    def write_summary(self, summary: dict) -> None:
        write_atomic(self.path / SUMMARY_FILE,
                     (json.dumps(finite_or_null(summary), indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def _metrics_line(record: dict) -> str:
    return json.dumps(finite_or_null(record), sort_keys=True, allow_nan=False) + "\n"


def finite_or_null(value):
    """`value` with every NaN/inf float as None: metrics files are strict JSON (a metric with no positives
    is null, not the bare NaN that JSON readers refuse)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


REQUIRED_META = ("head_config", "train_config", "label_set", "label_names", "fine_label_set", "fine_label_names",
                 "cache_provenance", "cache_dir", "dataset", "feature_dim", "tokens")   # what the load path reads
SAME_IN_A_RUN = ("feature_dim", "label_set", "label_names", "fine_label_set", "fine_label_names", "multi_label",
                 "tokens", "cache_provenance", "head_config")   # best and last of one run agree on these


def _brief(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _read_meta(path: Path) -> dict:
    """The cmdcl metadata of a checkpoint from its header alone (last also holds the optimizer's tensors)."""
    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if not 0 < header_len <= MAX_HEADER_BYTES:
                raise ValueError(f"header of {header_len} bytes")
            meta = json.loads(json.loads(fh.read(header_len))["__metadata__"]["cmdcl"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise CheckpointError(f"{path}: not a cmdcl checkpoint ({type(err).__name__}: {str(err)[:200]}); nothing "
                              "was loaded") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata is not a JSON object; nothing was loaded")
    return meta


MAX_HEADER_BYTES = 100 << 20   # safetensors' own limit


def config_toml(head, train) -> str:
    """The TOML text of a run's options, as `--config` reads it back."""
    return to_toml({"train": _public(train), "head": _public(head)})


def _public(cfg) -> dict:
    """The configuration without its derived (cli=False) fields, which the trainer recomputes, and --resume."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.metadata.get("cli", True) and f.name != "resume"}


def _flat(record: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif not isinstance(value, list):
            out[prefix + key] = value
    return out


def _unshared(tensors: dict) -> dict:
    """safetensors refuses tensors sharing memory: give each its own copy when two share."""
    seen, out = set(), {}
    for k, v in tensors.items():
        ptr = (v.data_ptr(), v.numel())
        out[k] = v.clone() if ptr in seen and v.numel() else v
        seen.add(ptr)
    return out


MAX_CHECKPOINT_BYTES = 16 << 30   # a head is megabytes; anything this big is not a checkpoint of ours


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not path.is_file() or path.stat().st_size > MAX_CHECKPOINT_BYTES:   # /dev/zero, a FIFO, a folder
        raise CheckpointError(f"{path}: not a regular file of a plausible size; nothing was loaded")
    try:
        data = path.read_bytes()
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        meta = json.loads(header.get("__metadata__", {})["cmdcl"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise CheckpointError(f"{path}: not a cmdcl checkpoint ({type(err).__name__}: {str(err)[:200]}); nothing "
                              "was loaded") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata is not a JSON object; nothing was loaded")
    return tensors, meta


# --------------------------------------------------------------------------- optimizer and RNG, as tensors

def _split_optimizer(state: dict) -> tuple[dict, dict]:
    """An optimizer state dict as (tensors, JSON): per-parameter tensors get names, the rest stays plain."""
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, per_param in state["state"].items():
        plain["state"][str(idx)] = {}
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
                plain["state"][str(idx)][key] = "tensor"
            else:
                plain["state"][str(idx)][key] = value
    return tensors, plain


def _join_optimizer(tensors: dict, plain: dict) -> dict:
    state = {}
    for idx, per_param in plain["state"].items():
        state[int(idx)] = {k: (tensors[f"optim.{idx}.{k}"] if v == "tensor" else v) for k, v in per_param.items()}
    return {"state": state, "param_groups": plain["param_groups"]}


def _rng_state() -> tuple[dict, dict]:
    """Every RNG a resumed run must continue: torch (CPU, CUDA), numpy's global and Python's."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(keys.astype(np.int64)),
               "rng.python": torch.tensor(py_state, dtype=torch.int64)}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors, {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, py_gauss]}


def set_rng_state(rng: dict) -> None:
    t = rng["tensors"]
    torch.set_rng_state(t["rng.torch"])
    kind, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, t["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_gauss = rng["python"]
    random.setstate((version, tuple(int(x) for x in t["rng.python"].tolist()), py_gauss))
    cuda = [t[k] for k in sorted((k for k in t if k.startswith("rng.cuda.")), key=lambda k: int(k.split(".")[2]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
