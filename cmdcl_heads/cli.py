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


@confounders_app.command("build", help="Build V_P and Z (FAISS k-means on the training split) into confounders.h5.")
def confounders_build(
    cache: Path = typer.Option(..., "--cache", help="Cache folder holding the frames-*.h5 shards."),
    dataset: str = typer.Option(..., "--dataset", help="Manifest: built-in name or folder."),
    kp: int = typer.Option(256, "--kp", help="K_p: bias prototypes V_P (textual back-door)."),
    kz: int = typer.Option(512, "--kz", help="K_z: visual dictionary Z (front-door cross-sample term)."),
    niter: int = typer.Option(20, "--niter", help="k-means iterations."),
    seed: int = typer.Option(0, "--seed", help="Seed of the point sample and of k-means (Z uses seed + 1)."),
    spherical: bool = typer.Option(True, "--spherical/--no-spherical",
                                   help="Spherical k-means on L2-normalised features."),
    max_points: int = typer.Option(262_144, "--max-points", help="Frames sampled (seeded) for k-means."),
    prototypes: str = typer.Option("kmeans", "--prototypes", help="V_P from 'kmeans' or 'class-mean'."),
    split_scheme: Optional[str] = typer.Option(None, "--split-scheme",
                                               help="Split scheme whose training split is used."),
    label_set: Optional[str] = typer.Option(None, "--label-set",
                                            help="Labels of class-mean prototypes (default: the fine set)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="FAISS OpenMP threads."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file (default: CACHE/confounders.h5)."),
) -> None:
    from rich.console import Console
    from rich.table import Table

    from cmdcl_cache.manifest import ManifestError, load_manifest
    from cmdcl_cache.cache import Cache
    from cmdcl_cache.store import CacheError
    from cmdcl_heads.confounders import FILE_NAME, build_confounders

    console = Console(stderr=True)
    if prototypes not in ("kmeans", "class-mean"):
        raise typer.BadParameter(f"expected 'kmeans' or 'class-mean', got {prototypes!r}",
                                 param_hint="--prototypes")
    try:
        manifest = load_manifest(dataset)
        store = Cache(cache)
        conf = build_confounders(store, manifest, kp=kp, kz=kz, niter=niter, seed=seed, spherical=spherical,
                                 max_points=max_points, prototypes=prototypes, split_scheme=split_scheme,
                                 label_set=label_set, threads=threads)
    except (ManifestError, CacheError, KeyError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    path = conf.save(out or Path(cache) / FILE_NAME)
    s = conf.settings
    table = Table(title=f"confounders of {s['dataset']}", show_header=True)
    for col in ("dictionary", "K", "source", "k-means objective", "max prior", "min prior"):
        table.add_column(col)
    table.add_row("V_P", str(len(conf.vp)), prototypes if prototypes == "kmeans" else f"class means ({s['label_set']})",
                  f"{s['objective'].get('vp', float('nan')):.4g}", f"{conf.vp_prior.max():.4f}",
                  f"{conf.vp_prior.min():.4f}")
    table.add_row("Z", str(len(conf.z)), "kmeans", f"{s['objective']['z']:.4g}", f"{conf.z_prior.max():.4f}",
                  f"{conf.z_prior.min():.4f}")
    console.print(table)
    console.print(f"{s['train_videos']} training videos, {s['train_frames']} frames ({s['points']} clustered); "
                  f"wrote {path}")


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
    eval_split: str = typer.Option("test", help="Split reported in summary.json (and evaluated each epoch)."),
    select_split: str = typer.Option(
        "auto", help="Split whose primary metric picks best.pt: auto (val when the manifest has val videos for "
                     "the label set, else none), none (best.pt = last epoch), or a split; never the eval split."),
    eval_every: int = typer.Option(1, help="Evaluate every k epochs (and after the last)."),
    data_mode: DataMode = typer.Option(DataMode.auto, help="memory: all features on the device; lazy: HDF5 reads."),
    workers: int = typer.Option(2, help="DataLoader workers in lazy mode."),
    amp: bool = typer.Option(True, help="bf16 autocast on GPU."),
    cudnn_attention: bool = typer.Option(False, help="Let training use cuDNN's fused attention on GPU (off by "
                                                     "default: its bf16 backward is reported to return NaN "
                                                     "gradients on H100/H200, PyTorch issue #196678)."),
    tokens: Optional[bool] = typer.Option(None, "--tokens/--no-tokens", help="Use grid tokens (default: when cached)."),
    fine_label_set: Optional[str] = typer.Option(None, help="Mediator vocabulary (cmdcl; default: manifest's fine set)."),
    tci: bool = typer.Option(True, help="cmdcl: textual causal intervention."),
    vci: bool = typer.Option(True, help="cmdcl: visual causal intervention."),
    mediator: bool = typer.Option(True, help="cmdcl: text-guided mediator inside VCI."),
    cross_sample: bool = typer.Option(True, help="cmdcl: cross-sample approximator inside VCI."),
    mediator_mode: str = typer.Option("gate", help="cmdcl, *ours*: gate (Xm = X*sigmoid(M)), replace (Xm = M) "
                                                   "or project (frames projected onto the fine-text span "
                                                   "before the temporal encoder)."),
    cross_sample_mode: str = typer.Option("attend", help="cmdcl, *ours*: attend (attention over Z, fused) or "
                                                         "backdoor (class scores averaged over Z strata by P(z))."),
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
    try:
        cfg = HeadConfig(**{k: v for k, v in values.items() if k in head_keys})
        opts = TrainOptions(**{k: (str(v) if k in ("cache", "out") else v)
                               for k, v in values.items() if k in opt_keys})
        run_train(opts, cfg)
    except KeyboardInterrupt:
        typer.echo(f"interrupted: continue with the same command and --resume ({values['out']}/last.pt)",
                   err=True)
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



@app.command()
def explain(
    run: Path = typer.Option(..., help="Run folder of a `--model cmdcl` training."),
    video: str = typer.Option(..., help="Video id to explain."),
    out: Optional[Path] = typer.Option(None, help="PNG to write (default: RUN/explain-VIDEO.png)."),
    checkpoint: Checkpoint = typer.Option(Checkpoint.best, help="Which checkpoint."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default: the one the run used)."),
    dataset: Optional[str] = typer.Option(None, help="Manifest (default: the one the run used)."),
    top_k: int = typer.Option(8, help="Atomic actions and dictionary entries shown."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
):
    """Plot which atomic actions and dictionary entries a CMDCL head attends to for one video."""
    from .explain import explain_run

    try:
        path = explain_run(run, video, out, checkpoint.value, None if cache is None else str(cache), dataset,
                           device, top_k)
    except (ValueError, RuntimeError, FileNotFoundError, KeyError) as err:
        _fail(err)
    typer.echo(f"wrote {path}")


if __name__ == "__main__":
    app()
