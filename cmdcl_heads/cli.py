"""`cmdcl-heads`: confounder dictionaries, training, evaluation, prediction and explanations on cached features.

`train` and `confounders build` take their flags from the configuration dataclasses (cmdcl_heads/config.py,
cmdcl_heads/confounders.py) and also read them from `--config FILE` (TOML; a run folder's config.toml
repeats that run); `train --preset NAME` starts from a shipped set of options (cmdcl_heads/presets/).
"""

from __future__ import annotations

from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Optional

import typer

from cmdcl_cache.config import ConfigError, config_command, version_option
from cmdcl_cache.progress import configure_logging, console, markup_mode

from .config import HeadConfig, TrainConfig
from .confounders import ConfoundersConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=markup_mode(),
                  help="Train and evaluate heads (baselines and CMDCL) on cached CLIP features.")
confounders_app = typer.Typer(no_args_is_help=True, rich_markup_mode=markup_mode(), help="Confounder dictionaries built with FAISS k-means.")
app.add_typer(confounders_app, name="confounders")


@app.callback()
def _main(version: bool = version_option("cmdcl-heads")):
    """Train and evaluate heads (baselines and CMDCL) on cached CLIP features."""


class Checkpoint(str, Enum):
    best = "best"
    last = "last"


def _fail(err) -> None:
    console(stderr=True).print(f"error: {err}", markup=False)
    raise typer.Exit(2)


def preset_names() -> list[str]:
    """The shipped presets, cmdcl_heads/presets/*.toml."""
    folder = resources.files("cmdcl_heads") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml")) if folder.is_dir() else []


def preset_path(name: str) -> Path:
    """A shipped preset, cmdcl_heads/presets/NAME.toml."""
    folder = resources.files("cmdcl_heads") / "presets"
    names = preset_names()
    if name not in names:
        raise ConfigError(f"--preset {name!r}: no such preset (shipped: {', '.join(names) or 'none'})")
    return Path(str(folder / f"{name}.toml"))


_ERRORS = (ValueError, RuntimeError, OSError, KeyError)   # OSError: read-only disks, paths that are files


@config_command(confounders_app, "build", (ConfoundersConfig,), handle=_fail,
                help="Build V_P and Z (FAISS k-means on the training split) into confounders.h5.")
def confounders_build(config: ConfoundersConfig) -> None:
    from .confounders import build_and_save, render

    configure_logging()
    try:
        conf, path = build_and_save(config)
    except _ERRORS as err:
        _fail(err)
    render(conf, path, console(stderr=True))


_PRESETS_HELP = {"paper": "cmdcl, H = 8 layers, 64 frames, the figure-4 approximator",
                 "coin": "paper + label set task, fine set step", "breakfast": "paper + activity / action",
                 "charades": "paper + multi-label action"}
_TRAIN_EPILOG = ("Presets (--preset NAME, cmdcl_heads/presets/): "
                 + "; ".join(f"{n} ({_PRESETS_HELP.get(n, 'see its file')})" for n in preset_names())
                 + ". Flags and --config override a preset.")


@config_command(app, "train", (HeadConfig, TrainConfig), handle=_fail, presets=preset_path, epilog=_TRAIN_EPILOG,
                help="Train a head on cached features (zeroshot: evaluate only) and write the run folder.")
def train(head: HeadConfig, config: TrainConfig):
    from .train import train as run_train

    configure_logging()
    try:
        run_train(config, head)
    except KeyboardInterrupt:
        console(stderr=True).print(f"interrupted: continue with the same command and --resume "
                                   f"({config.out}/last.safetensors)", markup=False)
        raise typer.Exit(130)
    except _ERRORS as err:
        _fail(err)


@app.command("eval")
def eval_(
    run: Path = typer.Option(..., help="Run folder written by `train`."),
    checkpoint: Checkpoint = typer.Option(Checkpoint.best, help="Which checkpoint."),
    split: Optional[str] = typer.Option(None, help="Split(s) to evaluate, comma-separated, any the manifest "
                                                   "declares (e.g. val,test,test_ood); default: the run's eval split."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default: the one the run used)."),
    dataset: Optional[str] = typer.Option(None, help="Manifest (default: the one the run used)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    data_mode: str = typer.Option("auto", help="memory or lazy feature loading (auto: memory when it fits)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics to this JSON file "
                                                                 "({split: metrics} for several splits)."),
):
    """Evaluate a run's checkpoint on one or more splits (one model load) and print the metrics table."""
    import json

    from .evaluate import evaluate_splits

    splits = [s.strip() for s in split.split(",") if s.strip()] if split else None
    try:
        out = evaluate_splits(run, checkpoint.value, splits, None if cache is None else str(cache), dataset,
                              device, data_mode)
        if json_out:
            value = out if splits and len(splits) > 1 else next(iter(out.values()))
            json_out.write_text(json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n")
    except _ERRORS as err:
        _fail(err)


@app.command()
def predict(
    run: Path = typer.Option(..., help="Run folder written by `train`."),
    video: Optional[list[Path]] = typer.Option(None, help="A video file or a folder of them, in no manifest: "
                                                         "decoded and encoded as the run's cache was (repeat "
                                                         "--video for more). Without it: a split of the cache."),
    out: Optional[Path] = typer.Option(None, help="Output JSON Lines, one video per line (default: "
                                                  "RUN/predictions.jsonl)."),
    top_k: int = typer.Option(5, min=1, help="Labels kept per video."),
    checkpoint: Checkpoint = typer.Option(Checkpoint.best, help="Which checkpoint."),
    split: Optional[str] = typer.Option(None, help="Split to predict (default: the run's eval split)."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default: the one the run used)."),
    dataset: Optional[str] = typer.Option(None, help="Manifest (default: the one the run used)."),
    pretrained: Optional[str] = typer.Option(None, help="With --video: the checkpoint file of the image tower, "
                                                        "when the cache was made from one (checked by sha256)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
):
    """Write per-video top-k predictions (label keys, names, scores) as JSON Lines."""
    from .evaluate import predict_files, predict_run

    out = out or run / "predictions.jsonl"
    if out.is_dir():   # before any decoding: the write at the end would fail
        _fail(f"--out {out} is a folder; give a file name, e.g. {out / 'predictions.jsonl'}")
    configure_logging()
    try:
        if not video:
            n = predict_run(run, out, top_k, checkpoint.value, split, None if cache is None else str(cache),
                            dataset, device)
            typer.echo(f"wrote {n} predictions to {out}")
            return
        n, failed = predict_files(run, video, out, top_k, checkpoint.value, device, pretrained)
    except _ERRORS as err:
        _fail(err)
    _show_file_predictions(out)
    for path, error in failed:
        console(stderr=True).print(f"failed: {path}: {error}", markup=False)
    typer.echo(f"wrote {n} predictions to {out}" + (f"; {len(failed)} file(s) failed" if failed else ""))
    if failed:
        raise typer.Exit(1 if n else 2)


def _show_file_predictions(path: Path) -> None:
    import json

    from rich.table import Table

    table = Table(title=f"predictions ({path})")
    for col in ("file", "top-1", "score", "next"):
        table.add_column(col)
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "top_k" in r:
            top = r["top_k"]
            table.add_row(Path(r["file"]).name, top[0]["name"], f"{top[0]['score']:.3f}",
                          ", ".join(f"{t['name']} {t['score']:.2f}" for t in top[1:3]))
    console().print(table)


@app.command()
def explain(
    run: Path = typer.Option(..., help="Run folder of a `--model cmdcl` training."),
    video: str = typer.Option(..., help="Video id to explain."),
    out: Optional[Path] = typer.Option(None, help="PNG to write (default: RUN/explain-VIDEO.png)."),
    checkpoint: Checkpoint = typer.Option(Checkpoint.best, help="Which checkpoint."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default: the one the run used)."),
    dataset: Optional[str] = typer.Option(None, help="Manifest (default: the one the run used)."),
    top_k: int = typer.Option(8, min=1, help="Atomic actions and dictionary entries shown."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
):
    """Plot which atomic actions and dictionary entries a CMDCL head attends to for one video."""
    from .explain import explain_run

    try:
        path = explain_run(run, video, out, checkpoint.value, None if cache is None else str(cache), dataset,
                           device, top_k)
    except _ERRORS as err:
        _fail(err)
    typer.echo(f"wrote {path}")


if __name__ == "__main__":
    app()
