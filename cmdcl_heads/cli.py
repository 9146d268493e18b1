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


def preset_path(name: str) -> Path:
    """A shipped preset, cmdcl_heads/presets/NAME.toml."""
    folder = resources.files("cmdcl_heads") / "presets"
    names = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml")) if folder.is_dir() else []
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


@config_command(app, "train", (HeadConfig, TrainConfig), handle=_fail, presets=preset_path,
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


_SWEEP_OPTIONS = {
    "grid": (Optional[list[str]], typer.Option(
        None, "--grid", help="OPTION=V1,V2,...: values of one train option, parsed by its type (repeat "
                             "--grid for more axes; every combination is a point), e.g. layers=0,2,4,6,8,10.")),
    "seeds": (int, typer.Option(1, "--seeds", help="Seeds per point: --seed, --seed+1, ...")),
    "ablation": (bool, typer.Option(False, "--ablation", help="Add the paper's ablation axis 'variant': full, "
                                                            "no-tci, no-vci, no-mediator, no-cross-sample.")),
    "jobs": (int, typer.Option(1, "--jobs", min=1, help="Points trained at once, each its own process.")),
    "slurm": (bool, typer.Option(False, "--slurm", help="Only write OUT/slurm.sh, an array job of one task per "
                                                      "point, for sbatch (nothing is submitted or trained).")),
    "point": (Optional[int], typer.Option(None, "--point", help="Train only this point (0-based), of the sweep "
                                                               "that --slurm recorded: what a Slurm task runs.")),
}


@config_command(app, "sweep", (HeadConfig, TrainConfig), handle=_fail, presets=preset_path, extra=_SWEEP_OPTIONS,
                help="Train a grid of option values x seeds: one run folder per point under --out (the sweep "
                     "folder); finished points are skipped, half-finished ones resumed; then `collect`.",
                epilog="The other options are the base of every point, as for `train`; --out is the sweep "
                       "folder, and a sweep always resumes (--resume is not needed). Example: cmdcl-heads sweep "
                       "--cache C --dataset demo --grid layers=0,2,4 --seeds 3 --out sweeps/layers. README: "
                       "\"Reproduce the paper's experiments\".")
def sweep(head: HeadConfig, config: TrainConfig, grid, seeds, ablation, jobs, slurm, point):
    from .sweep import SweepSpec
    from .sweep import sweep as run_sweep

    configure_logging()
    try:
        result = run_sweep(head, config, SweepSpec(tuple(grid or ()), seeds, ablation), jobs, slurm, point)
    except _ERRORS as err:
        _fail(err)
    if result["script"] is not None:
        typer.echo(f"wrote {result['script']} ({len(result['points'])} tasks); submit it with sbatch "
                   f"{result['script']}, then run: cmdcl-heads collect {result['script'].parent}")
        return
    if point is None:
        _collect(Path(config.out), config.quiet)
    for p, code in result["failed"]:
        console(stderr=True).print(f"failed: {p.name} (exit {code}; see {p.folder / 'train.log'})", markup=False)
    if result["failed"]:
        raise typer.Exit(1)


def _collect(folder: Path, quiet: bool) -> None:
    from .sweep_report import collect as write_results
    from .sweep_report import rich_table

    try:
        out = write_results(folder)
    except _ERRORS as err:
        _fail(err)
    console(quiet=quiet).print(rich_table(out["table"], f"sweep {folder}"))
    typer.echo(f"wrote {', '.join(str(p) for p in out['paths'].values())}")


@app.command()
def collect(
    sweep_folder: Path = typer.Argument(..., metavar="SWEEP", help="Folder written by `cmdcl-heads sweep`."),
    quiet: bool = typer.Option(False, "--quiet", help="No table."),
):
    """Write a sweep's results.md, results.csv and sweep.png from its finished points (after a Slurm array)."""
    _collect(sweep_folder, quiet)


class Format(str, Enum):
    table = "table"
    md = "md"
    csv = "csv"
    json = "json"


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., metavar="RUN|SWEEP...", help="Run folders and sweep folders (a sweep "
                                                                        "stands for its finished points)."),
    format: Format = typer.Option(Format.table, "--format", help="table, md, csv or json."),
):
    """One table of runs: the options that differ between them (only those), the primary metric per split,
    the selected epoch and the seconds spent."""
    from .compare import comparison, render

    try:
        out = render(comparison(runs), format.value)
    except _ERRORS as err:
        _fail(err)
    if isinstance(out, str):
        typer.echo(out, nl=False)
    else:
        console().print(out)


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
