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
from .confounders import ConfoundersConfig, build_and_save, render

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=markup_mode(),
                  help="Train and evaluate heads (baselines and CMDCL) on cached CLIP features.")
confounders_app = typer.Typer(no_args_is_help=True, rich_markup_mode=markup_mode(), help="Confounder dictionaries built with FAISS k-means.")
app.add_typer(confounders_app, name="confounders")
figures_app = typer.Typer(no_args_is_help=True, rich_markup_mode=markup_mode(),
                          help="The CMDCL paper's diagnostic figures on your data and runs: each writes a PNG and "
                               "its numbers as JSON beside it (same name).")
app.add_typer(figures_app, name="figures")


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


SPLIT_PREDICTIONS, FILE_PREDICTIONS = "predictions.jsonl", "predictions-files.jsonl"
_ERRORS = (ValueError, RuntimeError, OSError, KeyError)   # OSError: read-only disks, paths that are files


@config_command(confounders_app, "build", (ConfoundersConfig,), handle=_fail,
                help="Build V_P and Z (FAISS k-means on the training split) into confounders.h5.")
def confounders_build(config: ConfoundersConfig) -> None:

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
    import signal

    from .sweep import SweepSpec, failure_reason
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
    if result.get("stopped"):
        console(stderr=True).print(f"stopped by {result['stopped']}: the signal was forwarded to the running "
                                   "trainings; run the same sweep again to resume", markup=False)
        raise typer.Exit(128 + signal.Signals[result["stopped"]].value)
    if point is None:
        _collect(Path(config.out), config.quiet)
    for p, code in result["failed"]:
        reason = failure_reason(p) if code == 2 else ""
        console(stderr=True).print(f"failed: {p.name} (exit {code}; see {p.folder / 'train.log'})"
                                   + (f": {reason}" if reason else ""), markup=False)
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
    quiet: bool = typer.Option(False, help="One result line (each split's metrics) instead of the table."),
):
    """Evaluate a run's checkpoint on one or more splits (one model load) and print the metrics table."""
    import json

    from .evaluate import evaluate_splits
    from .run import finite_or_null

    splits = [s.strip() for s in split.split(",") if s.strip()] if split else None
    try:
        out = evaluate_splits(run, checkpoint.value, splits, None if cache is None else str(cache), dataset,
                              device, data_mode, quiet=quiet)
        if json_out:
            value = out if splits and len(splits) > 1 else next(iter(out.values()))
            json_out.write_text(json.dumps(finite_or_null(value), indent=2, sort_keys=True, allow_nan=False) + "\n")
    except _ERRORS as err:
        _fail(err)
    if quiet:
        typer.echo("; ".join(f"{name}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                             for name, metrics in out.items()))


@app.command()
def predict(
    run: Path = typer.Option(..., help="Run folder written by `train`."),
    video: Optional[list[Path]] = typer.Option(None, help="A video file or a folder of them, in no manifest: "
                                                         "decoded and encoded as the run's cache was (repeat "
                                                         "--video for more). Without it: a split of the cache."),
    out: Optional[Path] = typer.Option(None, help="Output JSON Lines, one video per line (default: "
                                                  f"RUN/{SPLIT_PREDICTIONS} for a split, RUN/{FILE_PREDICTIONS} "
                                                  "with --video). An existing file is refused unless --force."),
    force: bool = typer.Option(False, help="Replace an existing --out file (without it: exit 2 before any work)."),
    top_k: int = typer.Option(5, min=1, help="Labels kept per video."),
    checkpoint: Checkpoint = typer.Option(Checkpoint.best, help="Which checkpoint."),
    split: Optional[str] = typer.Option(None, help="Split to predict (default: the run's eval split)."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default: the one the run used)."),
    dataset: Optional[str] = typer.Option(None, help="Manifest (default: the one the run used)."),
    pretrained: Optional[str] = typer.Option(None, help="With --video: the checkpoint file of the image tower, "
                                                        "when the cache was made from one (checked by sha256)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    quiet: bool = typer.Option(False, help="One result line (what was written where) instead of the table."),
):
    """Write per-video top-k predictions (label keys, names, scores) as JSON Lines.

    A split's predictions and those of --video files go to different files, and no file is replaced unless
    --force says so: predicting new files never overwrites the split's predictions.
    """
    from .evaluate import predict_files, predict_run

    out = out or run / (FILE_PREDICTIONS if video else SPLIT_PREDICTIONS)
    if out.is_dir():   # before any decoding: the write at the end would fail
        _fail(f"--out {out} is a folder; give a file name, e.g. {out / SPLIT_PREDICTIONS}")
    _check_out(out, force)   # its default too: a split's and the files' predictions are never replaced unasked
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
    if not quiet:
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


_FORCE = typer.Option(False, help="Replace an existing --out file (without it: exit 2 before any work).")


def _check_out(out: Optional[Path], force: bool, figure: bool = False) -> None:
    """Refuse an explicit --out that would replace a file (a run's summary.json, another figure) unless --force;
    a figure's numbers go beside it (.json), so that name is checked too and a .json --out is refused."""
    if out is None:   # the default outputs are the command's own: replaced freely
        return
    if figure and out.suffix.lower() == ".json":
        _fail(f"--out {out} ends in .json: a figure is a PNG and its numbers go beside it (.json); give e.g. "
              f"{out.with_suffix('.png')}")
    for path in (out, out.with_suffix(".json")) if figure else (out,):
        if path.exists() and not force:
            what = f"--out {out} exists" if path == out else f"--out {out}: its numbers' file {path} exists"
            _fail(f"{what}; pass --force to replace it, or give another --out")


@app.command()
def explain(
    run: Path = typer.Option(..., help="Run folder of a `--model cmdcl` training."),
    video: str = typer.Option(..., help="Video id of the run's cache, or a video file in no manifest (decoded and "
                                        "encoded as the run's cache was, as `predict --video` does)."),
    out: Optional[Path] = typer.Option(None, help="PNG to write (default: RUN/explain-VIDEO.png, replaced if it "
                                                  "exists). An existing --out file is refused unless --force."),
    force: bool = _FORCE,
    checkpoint: Checkpoint = typer.Option(Checkpoint.best, help="Which checkpoint."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default: the one the run used)."),
    dataset: Optional[str] = typer.Option(None, help="Manifest (default: the one the run used)."),
    top_k: int = typer.Option(8, min=1, help="Atomic actions and dictionary entries shown."),
    pretrained: Optional[str] = typer.Option(None, help="With a video file: the checkpoint file of the image tower, "
                                                        "when the cache was made from one (checked by sha256)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    quiet: bool = typer.Option(False, help="Accepted like predict's and eval's, for scripts that pass it to every "
                                           "command: explain prints only its result line (the PNG written)."),
):
    """Plot which atomic actions and dictionary entries (named by their nearest label) a CMDCL head attends to
    for one video."""
    from .explain import explain_run

    _check_out(out, force)
    try:
        path = explain_run(run, video, out, checkpoint.value, None if cache is None else str(cache), dataset,
                           device, top_k, pretrained)
    except _ERRORS as err:
        _fail(err)
    typer.echo(f"wrote {path}")


@app.command("report")
def report_page(
    runs: list[Path] = typer.Argument(..., help="Run folders written by `train`; several are shown side by side."),
    out: Path = typer.Option(..., help="HTML file to write. An existing file is refused unless --force."),
    force: bool = _FORCE,
    errors: int = typer.Option(8, min=0, help="Worst errors shown per run: the eval split's most confident "
                                              "wrong predictions, predicted again on the run's cache (0: the "
                                              "cache is not read)."),
    explain: bool = typer.Option(True, help="CMDCL runs: `explain`'s picture for each error shown."),
    device: str = typer.Option("cpu", help="Where the worst errors are predicted: cpu, auto, cuda or cuda:N."),
):
    """One self-contained HTML page (no network; images inlined): configuration, metrics per split, curves,
    confusion matrix or per-class AP, the worst errors with their explanations, the cache's provenance."""
    from .page import write_report

    if out.is_dir():
        _fail(f"--out {out} is a folder; give a file name, e.g. {out / 'report.html'}")
    _check_out(out, force)
    configure_logging()
    try:
        path = write_report(runs, out, errors, explain, device)
    except _ERRORS as err:
        _fail(err)
    typer.echo(f"wrote {path} ({len(runs)} run{'s' if len(runs) > 1 else ''}, {path.stat().st_size // 1024} KiB)")
# ------------------------------------------------------------------------------- figures (the paper's)

_ACTIVITY = typer.Option(None, "--activity", help="Activity to show (key or name; repeat for more). Default: the "
                                                  "first two of the label set that have videos.")
_DEVICE = typer.Option("auto", help="auto, cpu, cuda or cuda:N.")


_FIG_OUT = "An explicit --out is refused where it or its .json exists, unless --force."


def _figure(make, out: Optional[Path] = None, force: bool = False) -> None:
    _check_out(out, force, figure=True)
    try:
        path = make()
    except _ERRORS as err:
        _fail(err)
    typer.echo(f"wrote {path} and {path.with_suffix('.json')}")


@figures_app.command("cooccurrence")
def figures_cooccurrence(
    dataset: str = typer.Option(..., help="Manifest: built-in name or folder."),
    out: Path = typer.Option(..., help="PNG to write (the numbers go to the same name with .json). An "
                                         "existing PNG or .json is refused unless --force."),
    force: bool = _FORCE,
    activity: Optional[list[str]] = _ACTIVITY,
    split: Optional[str] = typer.Option(None, help="Count the videos of this split only (default: all)."),
    label_set: Optional[str] = typer.Option(None, help="Activity label set (default: the manifest's default)."),
):
    """Co-occurrence of atomic actions per activity, from the manifest's segments (paper fig 1b)."""
    from .figures import cooccurrence_run

    _figure(lambda: cooccurrence_run(dataset, out, activity, split, label_set), out, force)


@figures_app.command("similarity")
def figures_similarity(
    run: Path = typer.Option(..., help="Run folder of a `--model cmdcl` training (with --tci)."),
    out: Optional[Path] = typer.Option(
        None, help=f"PNG to write (default: RUN/figures/similarity.png). {_FIG_OUT}"),
    force: bool = _FORCE,
    activity: Optional[list[str]] = _ACTIVITY,
    checkpoint: Checkpoint = typer.Option(Checkpoint.best, help="Which checkpoint."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default: the one the run used)."),
    dataset: Optional[str] = typer.Option(None, help="Manifest (default: the one the run used)."),
    device: str = _DEVICE,
):
    """Atomic-action text similarity before (E, T) and after TCI (T'), grouped by activity (paper fig 5)."""
    from .figures import similarity_run

    _figure(lambda: similarity_run(run, out, activity, checkpoint.value, None if cache is None else str(cache),
                                   dataset, device), out, force)


@figures_app.command("matching")
def figures_matching(
    run: list[Path] = typer.Option(..., help="Run folder; give --run twice to compare two runs side by side "
                                             "(e.g. text4vis and cmdcl)."),
    out: Optional[Path] = typer.Option(
        None, help=f"PNG to write (default: LAST_RUN/figures/matching.png). {_FIG_OUT}"),
    force: bool = _FORCE,
    activity: Optional[list[str]] = _ACTIVITY,
    split: Optional[str] = typer.Option(None, help="Split whose videos are used (default: the run's eval split)."),
    checkpoint: Checkpoint = typer.Option(Checkpoint.best, help="Which checkpoint."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default: the one the run used)."),
    dataset: Optional[str] = typer.Option(None, help="Manifest (default: the one the run used)."),
    device: str = _DEVICE,
):
    """Matching probability of atomic-action texts with each activity's videos (paper figs 1c, 7c).

    *inferred* definition: mean over the activity's videos of the softmax over all fine texts of s*cos(v, t_f)."""
    from .figures import matching_run

    _figure(lambda: matching_run(run, out, activity, split, checkpoint.value,
                                 None if cache is None else str(cache), dataset, device), out, force)


@figures_app.command("attention")
def figures_attention(
    run: list[Path] = typer.Option(..., help="Run folder trained on grid tokens; give --run twice to compare."),
    video: str = typer.Option(..., help="Video id (in the run's cache)."),
    video_root: Optional[Path] = typer.Option(None, help="Folder the manifest's video paths are relative to "
                                                         "(the frames are decoded from the file)."),
    out: Optional[Path] = typer.Option(
        None, help=f"PNG to write (default: LAST_RUN/figures/attention-VIDEO.png). {_FIG_OUT}"),
    force: bool = _FORCE,
    frames: int = typer.Option(4, min=1, help="Frames shown (evenly spread over the sampled ones)."),
    checkpoint: Checkpoint = typer.Option(Checkpoint.best, help="Which checkpoint."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default: the one the run used)."),
    dataset: Optional[str] = typer.Option(None, help="Manifest (default: the one the run used)."),
    device: str = _DEVICE,
):
    """Spatial attention over the patches, drawn on the decoded frames (paper fig 7a/b)."""
    from .figures import attention_run

    _figure(lambda: attention_run(run, video, out, video_root, frames, checkpoint.value,
                                  None if cache is None else str(cache), dataset, device), out, force)


if __name__ == "__main__":
    app()
