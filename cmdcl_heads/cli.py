"""`cmdcl-heads`: confounder dictionaries, training, evaluation and prediction on cached features."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train and evaluate heads (baselines and CMDCL) on cached CLIP features.")
confounders_app = typer.Typer(no_args_is_help=True, help="Confounder dictionaries built with FAISS k-means.")
app.add_typer(confounders_app, name="confounders")


class Model(str, Enum):
    zeroshot = "zeroshot"
    linear = "linear"
    text4vis = "text4vis"
    cmdcl = "cmdcl"


class DataMode(str, Enum):
    auto = "auto"
    memory = "memory"
    lazy = "lazy"


class Checkpoint(str, Enum):
    best = "best"
    last = "last"


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def merge_config(ctx: typer.Context, config: Path | None, values: dict) -> dict:
    """Defaults < TOML file < flags given on the command line (found through click's parameter source)."""
    merged = dict(values)
    if config is None:
        return merged
    try:
        table = tomllib.loads(Path(config).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise typer.BadParameter(f"{config}: {err}", param_hint="--config") from None
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in values or name in ("config", "resume"):
            allowed = ", ".join(sorted(k.replace("_", "-") for k in values if k not in ("config", "resume")))
            raise typer.BadParameter(f"{config}: unknown key {key!r} (keys mirror the flags: {allowed})",
                                     param_hint="--config")
        # by name: typer vendors its own click, whose ParameterSource is not click.core's
        source = getattr(ctx.get_parameter_source(name), "name", None)
        if source not in ("COMMANDLINE", "ENVIRONMENT"):
            merged[name] = value
    return merged


@app.command()
def train(
    ctx: typer.Context,
    cache: Optional[Path] = typer.Option(None, help="Cache folder holding the shards (or one above it)."),
    dataset: Optional[str] = typer.Option(None, help="Manifest: built-in name (coin, breakfast, demo…) or folder."),
    out: Optional[Path] = typer.Option(None, help="Run folder (checkpoints, metrics, plots)."),
    label_set: Optional[str] = typer.Option(None, help="Target label set (default: the manifest's default)."),
    model: Model = typer.Option(Model.cmdcl, help="Head to train."),
    frames: int = typer.Option(16, help="T frames sampled per video (TSN style)."),
    layers: int = typer.Option(2, help="Temporal transformer layers H."),
    heads: int = typer.Option(8, help="Attention heads."),
    dropout: float = typer.Option(0.1, help="Dropout in the temporal layers."),
    epochs: int = typer.Option(10, help="Training epochs."),
    batch_size: int = typer.Option(32, help="Videos per step."),
    lr: float = typer.Option(1e-3, help="Peak AdamW learning rate."),
    weight_decay: float = typer.Option(0.05, help="AdamW weight decay (matrices only)."),
    warmup: float = typer.Option(1.0, help="Linear warm-up length in epochs (then cosine)."),
    clip_grad: float = typer.Option(1.0, help="Max gradient norm (0: no clipping)."),
    seed: int = typer.Option(0, help="Seed of initialisation and sampling."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    split_scheme: Optional[str] = typer.Option(None, help="Split scheme (e.g. s1..s4, vis4mer); default: first."),
    eval_split: str = typer.Option("test", help="Split evaluated each epoch."),
    eval_every: int = typer.Option(1, help="Evaluate every k epochs (and after the last)."),
    data_mode: DataMode = typer.Option(DataMode.auto, help="memory: all features on the device; lazy: HDF5 reads."),
    workers: int = typer.Option(2, help="DataLoader workers in lazy mode."),
    amp: bool = typer.Option(True, help="bf16 autocast on GPU."),
    tokens: Optional[bool] = typer.Option(None, "--tokens/--no-tokens", help="Use grid tokens (default: when cached)."),
    fine_label_set: Optional[str] = typer.Option(None, help="Mediator vocabulary (cmdcl; default: manifest's fine set)."),
    tci: bool = typer.Option(True, help="cmdcl: textual causal intervention."),
    vci: bool = typer.Option(True, help="cmdcl: visual causal intervention."),
    mediator: bool = typer.Option(True, help="cmdcl: text-guided mediator inside VCI."),
    cross_sample: bool = typer.Option(True, help="cmdcl: cross-sample approximator inside VCI."),
    skip_missing: bool = typer.Option(False, help="Skip split videos missing from the cache instead of failing."),
    quiet: bool = typer.Option(False, help="No progress bar or table."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last.pt."),
    config: Optional[Path] = typer.Option(None, help="TOML file whose keys mirror these flags (flags win)."),
):
    """Train a head on cached features (zeroshot: evaluate only) and write the run folder."""
    from .config import HeadConfig
    from .train import TrainOptions, train as run_train

    values = merge_config(ctx, config, dict(ctx.params))
    for key in ("model", "data_mode"):
        values[key] = getattr(values[key], "value", values[key])
    missing = [f"--{k}" for k in ("cache", "dataset", "out") if not values.get(k)]
    if missing:
        _fail(f"missing {', '.join(missing)} (on the command line or in --config)")
    head_keys = {f.name for f in fields(HeadConfig)}
    opt_keys = {f.name for f in fields(TrainOptions)}
    cfg = HeadConfig(**{k: v for k, v in values.items() if k in head_keys})
    opts = TrainOptions(**{k: (str(v) if k in ("cache", "out") else v) for k, v in values.items() if k in opt_keys})
    try:
        run_train(opts, cfg)
    except KeyboardInterrupt:
        typer.echo(f"interrupted: continue with the same command and --resume ({opts.out}/last.pt)", err=True)
        raise typer.Exit(130)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        _fail(err)


@app.command("eval")
def eval_(
    run: Path = typer.Option(..., help="Run folder written by `train`."),
    checkpoint: Checkpoint = typer.Option(Checkpoint.best, help="Which checkpoint."),
    split: Optional[str] = typer.Option(None, help="Split to evaluate (default: the run's eval split)."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default: the one the run used)."),
    dataset: Optional[str] = typer.Option(None, help="Manifest (default: the one the run used)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    data_mode: DataMode = typer.Option(DataMode.auto, help="memory or lazy feature loading."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics to this JSON file."),
):
    """Evaluate a run's checkpoint and print its metrics table."""
    import json

    from .train import evaluate_run

    try:
        metrics = evaluate_run(run, checkpoint.value, split, None if cache is None else str(cache), dataset,
                               device, data_mode.value)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        _fail(err)
    if json_out:
        json_out.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


@app.command()
def predict(
    run: Path = typer.Option(..., help="Run folder written by `train`."),
    out: Path = typer.Option(..., help="Output JSON Lines, one video per line."),
    top_k: int = typer.Option(5, help="Labels kept per video."),
    checkpoint: Checkpoint = typer.Option(Checkpoint.best, help="Which checkpoint."),
    split: Optional[str] = typer.Option(None, help="Split to predict (default: the run's eval split)."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default: the one the run used)."),
    dataset: Optional[str] = typer.Option(None, help="Manifest (default: the one the run used)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
):
    """Write per-video top-k predictions (label keys, names, scores) as JSON Lines."""
    from .train import predict_run

    try:
        n = predict_run(run, out, top_k, checkpoint.value, split, None if cache is None else str(cache),
                        dataset, device)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        _fail(err)
    typer.echo(f"wrote {n} predictions to {out}")


if __name__ == "__main__":
    app()
