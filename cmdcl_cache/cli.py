"""`cmdcl-cache`: build manifests, make the demo set, extract CLIP features into HDF5 shards."""

from pathlib import Path
from typing import Optional

import typer

from cmdcl_cache.cache.folder import TEXTS_FILE
from cmdcl_cache.config import config_command, version_option
from cmdcl_cache.errors import CacheError
from cmdcl_cache.extract.pipeline import ExtractConfig, extract
from cmdcl_cache.extract.texts import TextsConfig
from cmdcl_cache.ingest.importer import ImportConfig
from cmdcl_cache.progress import configure_logging, console, markup_mode

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=markup_mode(),
                  help="Build manifests, render the demo set, and cache CLIP features of videos in HDF5.")


@app.callback()
def _main(version: bool = version_option("cmdcl-cache")):
    """Build manifests, render the demo set, and cache CLIP features of videos in HDF5."""


manifest_app = typer.Typer(no_args_is_help=True, rich_markup_mode=markup_mode(), help="Build and check dataset manifests.")
demo_app = typer.Typer(no_args_is_help=True, rich_markup_mode=markup_mode(), help="The offline demo set of rendered videos.")


app.add_typer(manifest_app, name="manifest")


app.add_typer(demo_app, name="demo")


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, _, h = text.lower().partition("x")
        return int(w), int(h or w)
    except ValueError:
        raise typer.BadParameter(f"expected WxH or N, got {text!r}") from None


@demo_app.command("make")
def demo_make(
    out: Path = typer.Argument(Path("demo"), help="Output folder (videos/ and manifest/ go inside)."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same set."),
    train: int = typer.Option(10, "--videos-per-activity", "--train", help="Train videos per activity."),
    val: int = typer.Option(2, "--val", help="In-distribution (confounded) val videos per activity."),
    test: int = typer.Option(8, "--test", help="Shifted (unconfounded) test videos per activity."),
    size: str = typer.Option("96x96", help="Frame size WxH (even numbers)."),
    fps: int = typer.Option(8, help="Frames per second."),
    own_share: float = typer.Option(0.9, help="Share of train/val videos on their activity's own background."),
) -> None:
    """Render the offline demo set (activities of ordered atomic actions over confounding backgrounds)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cmdcl_cache.manifest.demo import check_size_fps, make_demo

    frame_size = _parse_size(size)
    try:  # before the progress bar, so that a typo fails at once
        check_size_fps(frame_size, fps)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    out_console = console()
    with Progress(TextColumn("rendering"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=out_console) as bar:
        task = bar.add_task("render", total=None)

        def step(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            manifest_dir = make_demo(out, train, val, test, seed=seed, size=frame_size, fps=fps,
                                     own_share=own_share, progress=step)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    out_console.print(f"manifest: {manifest_dir}")
    video_root = out / "videos"
    env = "" if manifest_dir.resolve() == Path("demo/manifest").resolve() else f"CMDCL_DEMO={manifest_dir} "
    out_console.print(f"next: {env}cmdcl-cache extract --dataset demo --video-root {video_root} --cache cache "
                  "--model cmdcl-tiny --pretrained none", soft_wrap=True)


def _print_error(err) -> None:
    """`error: <message>` on stderr; several manifest problems one a line."""
    from rich.markup import escape

    errors = getattr(err, "errors", None)
    text = str(err) if not errors else f"{err.total} problems:\n  " + str(err).replace("\n", "\n  ")
    console(stderr=True).print(f"[red]error:[/red] {escape(text)}")


_BUILD_EPILOG = ("Your own videos: --dataset folder --videos DIR --out FOLDER, with one subfolder of DIR per class "
                 "(or --from-csv FILE: columns path,label[,split]). Then: cmdcl-cache extract --dataset FOLDER "
                 "--video-root DIR ...  Exit status 2 lists every problem found (file:line: field).")


@manifest_app.command("build", epilog=_BUILD_EPILOG)
def manifest_build(
    dataset: str = typer.Option(..., "--dataset", help="Builder: coin, breakfast, charades (from official "
                                                       "annotation files) or folder (your own videos)."),
    annotations: Optional[Path] = typer.Option(None, "--annotations", exists=True,
                                               help="coin, breakfast, charades: annotation folder (shared/datasets/"
                                                    "<name>, your Charades folder) or, for COIN, an official "
                                                    "COIN.json with the taxonomy CSVs beside it."),
    videos: Optional[Path] = typer.Option(None, "--videos", exists=True, file_okay=False,
                                          help="folder: the video root (the later --video-root); one subfolder "
                                               "per class, videos inside, unless --from-csv."),
    from_csv: Optional[Path] = typer.Option(None, "--from-csv", exists=True, dir_okay=False,
                                            help="folder: CSV with a header row path,label[,split]; paths relative "
                                                 "to --videos."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="folder, without a split column: share of each "
                                                                   "class's videos for val."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="folder, without a split column: share of each "
                                                                     "class's videos for test (at least one per "
                                                                     "class of two or more)."),
    seed: int = typer.Option(0, "--seed", help="folder: seed of the stratified split."),
    prompts: str = typer.Option("generic", "--prompts", help="folder: prompt template set for labels.json: generic "
                                                             "(any phrase), things (noun phrases) or actions (verb "
                                                             "phrases)."),
    name: Optional[str] = typer.Option(None, "--name", help="folder: dataset name, which names the cache folder "
                                                            "(default: the --out folder's name)."),
    source: str = typer.Option("", "--source", help="folder: where the videos come from (labels.json)."),
    licence: str = typer.Option("", "--licence", help="folder: the videos' licence (labels.json)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Manifest folder to write (folder: required; others: "
                                                           "default the built-in location, the package's "
                                                           "cmdcl_cache/manifests/<dataset>)."),
):
    """Build a manifest (videos.jsonl + labels.json) from a dataset's annotation files or your own videos."""
    from cmdcl_cache.manifest.builders import BUILDERS, build_manifest
    from cmdcl_cache.manifest.format import resolve_dataset_dir

    if dataset not in BUILDERS:
        raise typer.BadParameter(f"no builder for {dataset!r}; choose one of {', '.join(BUILDERS)}",
                                 param_hint="--dataset")
    options = {}
    if dataset == "folder":
        if videos is None or out is None or annotations is not None:
            raise typer.BadParameter("the folder builder needs --videos DIR and --out FOLDER (and reads no "
                                     "--annotations)", param_hint="--dataset folder")
        options = dict(videos=videos, csv_path=from_csv, val_fraction=val_fraction, test_fraction=test_fraction,
                       seed=seed, prompts=prompts, name=name, source=source,
                       licence=licence)
    elif annotations is None or videos is not None or from_csv is not None:
        raise typer.BadParameter(f"the {dataset} builder needs --annotations (--videos and --from-csv are for "
                                 "--dataset folder)", param_hint="--annotations")
    out = out or resolve_dataset_dir(dataset)
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} is a file; a manifest is a folder (labels.json, videos.jsonl)",
                                 param_hint="--out")
    try:
        m = build_manifest(dataset, annotations, out, **options)
    except ValueError as err:   # ManifestError(s) and bad options
        _print_error(err)
        raise typer.Exit(2)
    except OSError as err:      # a read-only or full disk, a folder we may not write
        _fail(f"cannot write the manifest to {out}: {err}", 2)
    _print_build_summary(console(), m, out, videos)


def _print_build_summary(console, m, out: Path, videos: Path | None) -> None:
    sizes = ", ".join(f"{n} {len(ls)}" for n, ls in m.label_sets.items())
    splits = ", ".join(f"{s} {len(m.select(s))}" for s in m.split_roles if m.select(s))
    console.print(f"wrote {out}: {len(m.videos)} videos; label sets: {sizes}; {splits}", markup=False)
    if videos is None:
        return
    ls = m.label_sets[m.default_label_set]
    for split in ("train", "val", "test"):
        have = {v.labels[ls.name] for v in m.select(split)}
        lacking = [k for k in ls.keys if k not in have]
        why = " (trained heads cannot learn them; zero-shot still can)" if split == "train" else ""
        if lacking and (len(lacking) < len(ls.keys) or split == "train"):
            console.print(f"note: no {split} video for {len(lacking)} class(es){why}: {', '.join(lacking[:10])}"
                          f"{', ...' if len(lacking) > 10 else ''}", markup=False)
    if not m.select("val"):
        console.print("note: no val videos: best is the last epoch and the linear probe uses its default "
                      "regularisation", markup=False)
    console.print(f"next: cmdcl-cache extract --dataset {out} --video-root {videos} --cache cache", markup=False)


@manifest_app.command("check")
def manifest_check(
    dataset: str = typer.Option(..., "--dataset", help="Built-in name (coin, breakfast, charades, demo) or a "
                                                       "manifest folder."),
    video_root: Path = typer.Option(..., "--video-root", exists=True, file_okay=False,
                                    help="Folder the manifest's paths are relative to."),
    show: int = typer.Option(20, "--show", help="How many missing / ambiguous videos to list."),
    missing_out: Optional[Path] = typer.Option(None, "--missing-out",
                                               help="Write the ids of missing videos to this file, one a line."),
    allow_missing: bool = typer.Option(False, "--allow-missing",
                                       help="Exit 0 even when videos are missing (ambiguous ones still fail)."),
):
    """Report which videos of a manifest are found, missing or ambiguous under --video-root."""
    from rich.table import Table

    from cmdcl_cache.manifest.format import ManifestError
    from cmdcl_cache.manifest.io import load_manifest
    from cmdcl_cache.manifest.paths import check_videos

    out = console()
    try:
        m = load_manifest(dataset)
    except ManifestError as e:
        _print_error(e)
        raise typer.Exit(2)
    result = check_videos(m.videos, video_root)
    table = Table(title=f"{m.dataset}: {len(m.videos)} videos under {video_root}")
    for col in ("status", "videos", *m.split_roles):
        table.add_column(col, justify="left" if col == "status" else "right")
    split_of = {v.video_id: v.split for v in m.videos}
    for status in ("found", "missing", "ambiguous"):
        ids = [x if isinstance(x, str) else x[0] for x in result[status]]
        counts = [sum(split_of[i] == s for i in ids) for s in m.split_roles]
        table.add_row(status, str(len(ids)), *map(str, counts))
    out.print(table)
    for status in ("missing", "ambiguous"):
        items = result[status]
        if not items:
            continue
        out.print(f"{status} ({len(items)}{', first ' + str(show) if len(items) > show else ''}):")
        for item in items[:show]:
            out.print(f"  {item}" if isinstance(item, str) else f"  {item[0]}: {', '.join(item[1])}",
                          highlight=False, markup=False)
    if missing_out is not None:
        missing_out.write_text("".join(i + "\n" for i in result["missing"]), encoding="utf-8")
    if result["ambiguous"] or (result["missing"] and not allow_missing):
        raise typer.Exit(1)


_EXIT_HELP = ("Exit status: 0 every selected video is in the cache, 1 some failed (listed in failures.jsonl; "
              "the cache holds the others), 2 nothing extracted or a fatal error.")


def _fail(message: str, code: int = 2):
    from rich.markup import escape  # the message is text: "pip install 'cmdcl[torchcodec]'" is no markup
    console(stderr=True).print(f"[red]error:[/red] {escape(message)}", markup=True)
    raise typer.Exit(code)


def _config_error(err):
    _fail(str(err), 2)


@config_command(app, "extract", (ExtractConfig,), handle=_config_error, epilog=_EXIT_HELP,
                help="Decode, sample and encode a dataset's videos into HDF5 shards (resumable; one shard per rank).")
def extract_cmd(config: ExtractConfig):
    from cmdcl_cache.cache.runlog import main_exit_message

    configure_logging()
    try:
        result = extract(config)
    except KeyboardInterrupt:
        _fail("interrupted; what is committed is kept: rerun the same command to resume", 2)
    except (ValueError, RuntimeError, OSError) as err:  # manifest, ranks, encoder, store, lock, options
        _fail(str(err), 2)
    console(stderr=True).print(main_exit_message(result), markup=False)
    print(result.cache_dir)
    raise typer.Exit(result.exit_code)


_IMPORT_EPILOG = ("Formats: npy = <id>.npy [T, D] (+ <id>_timestamps_ms.npy, <id>_fps.npy when present) or "
                  "<id>.npz, or an export-npy folder (its index.jsonl maps ids to files); video-features = <id>_<key>.npy + <id>_timestamps_ms.npy + <id>_fps.npy "
                  "(video_features' save_numpy output, key = its feature_type, default clip); safetensors = "
                  "<id>.safetensors with tensors features [, timestamps_ms, fps]; hdf5 = one file, a dataset <id> "
                  "or a group <id>/features [, timestamps_ms, fps] per video. .pt files are never unpickled. "
                  "A bad file is a failure in failures.jsonl (stage open or write); ids the manifest lacks are "
                  "fatal unless --allow-unknown. " + _EXIT_HELP)


@config_command(app, "import", (ImportConfig,), handle=_config_error, epilog=_IMPORT_EPILOG,
                help="Bring per-frame features made elsewhere into a cache (resumable; checked; sources hashed).")
def import_cmd(config: ImportConfig):
    from cmdcl_cache.ingest.importer import import_features, main_message

    configure_logging()
    try:
        result = import_features(config)
    except KeyboardInterrupt:
        _fail("interrupted; what is committed is kept: rerun the same command to resume", 2)
    except (ValueError, RuntimeError, OSError) as err:  # manifest, source, provenance, lock, write errors
        _fail(str(err), 2)
    err = console(stderr=True)
    err.print(main_message(result), markup=False)
    if result.committed and not (result.cache_dir / TEXTS_FILE).exists():
        err.print(f"next: cmdcl-cache texts --dataset {config.dataset} --cache {result.cache_dir} --model <open_clip "
                  "model> --pretrained <weights> (the text tower of the model that made the features), or "
                  "--text-embeddings FILE", markup=False)
    print(result.cache_dir)
    raise typer.Exit(result.exit_code)


_TEXTS_EPILOG = ("A cache of imported features (`cmdcl-cache import`) takes --model/--pretrained as the open_clip "
                 "text tower whose space the features share (for CLIP features, the model that made them), or "
                 "--text-embeddings FILE.")


@config_command(app, "texts", (TextsConfig,), handle=_config_error, epilog=_TEXTS_EPILOG,
                help="(Re)write texts.h5: prompt-ensembled text embeddings of every label set, from an open_clip "
                     "text tower or a file.")
def texts_cmd(config: TextsConfig):
    from cmdcl_cache.manifest.io import load_manifest

    configure_logging()
    try:
        m = load_manifest(config.dataset)
        if config.text_embeddings or config.label_set:
            return _texts_from_file(config, m)
        if _imported_texts(config, m):
            return
        _texts_from_encoder(config, m)
    except typer.Exit:
        raise
    except (ValueError, RuntimeError, OSError) as err:
        _fail(str(err), 2)


def _texts_from_file(config: TextsConfig, m) -> None:
    from cmdcl_cache.cache.folder import locate
    from cmdcl_cache.ingest.texts import write_texts_from_file

    if not config.text_embeddings:
        _fail("--label-set goes with --text-embeddings FILE")
    if config.prompts:
        _fail("--prompts and --text-embeddings exclude each other: prompts are for a text tower")
    folder = locate(config.cache, m.dataset, config.model, config.pretrained)
    path, uncovered = write_texts_from_file(folder, m, config.text_embeddings, config.label_set)
    if uncovered:
        console(stderr=True).print(f"warning: {path} has no embeddings of label set(s) {', '.join(uncovered)} "
                                   "(verify reports them; heads that use them need them): give an .npz or "
                                   ".safetensors with one array per label set", markup=False)
    print(f"wrote {path}")


def _imported_texts(config: TextsConfig, m) -> bool:
    """texts.h5 of an imported cache from the open_clip text tower named by --model/--pretrained."""
    from cmdcl_cache.extract.texts import imported_cache, write_imported_texts

    folder = imported_cache(Path(config.cache), m.dataset)
    if folder is None:
        return False
    if config.model is None or config.pretrained is None:
        _fail(f"{folder}: holds imported features; name the open_clip text tower whose space they share with "
              "--model and --pretrained (for CLIP features, the model that made them), or pass "
              "--text-embeddings FILE")
    path, written = write_imported_texts(folder, m, config.model, config.pretrained, config.precision,
                                         config.device, config.prompts, force=config.force)
    print(f"{'wrote' if written else 'up to date:'} {path}")
    return True


def _texts_from_encoder(config: TextsConfig, m) -> None:
    from cmdcl_cache.cache.folder import for_writing, locate
    from cmdcl_cache.cache.provenance import CacheSpec
    from cmdcl_cache.extract.encoder import EncoderSpec, load_encoder
    from cmdcl_cache.extract.texts import ensure_texts

    model, pretrained, precision = config.model, config.pretrained, config.precision
    if model is None or pretrained is None:   # infer what the existing cache was made with
        prov = locate(config.cache, m.dataset, model, pretrained).provenance()
        model, pretrained = model or prov["model"], pretrained or prov["pretrained"]
        precision = prov.get("precision", precision)
        if str(pretrained).startswith("sha256:"):
            _fail(f"{config.cache}: its weights were a checkpoint file ({pretrained[:19]}...); pass that file "
                  "with --pretrained")
    spec = CacheSpec(model=model, pretrained=pretrained, precision=precision, tokens=config.tokens,
                     grid=config.grid)
    folder = for_writing(Path(config.cache), m.dataset, spec)
    enc = load_encoder(EncoderSpec.of(spec, config.device))
    path, written = ensure_texts(folder, m, enc, spec, config.prompts, force=config.force)
    print(f"{'wrote' if written else 'up to date:'} {path}")


_CACHE_HELP = "A cache folder, or a folder above it (root or <root>/<dataset>)."
_FIND = "To choose among several caches below --cache."


def _locate(cache: Path, dataset: str | None, model: str | None, pretrained: str | None):
    from cmdcl_cache.cache.folder import locate
    from cmdcl_cache.manifest.io import load_manifest
    try:
        name = load_manifest(dataset).dataset if dataset else None
        return locate(cache, name, model, pretrained)
    except (ValueError, RuntimeError, OSError) as err:
        _fail(str(err), 2)


@app.command("verify", help="Check a cache: every selected video committed once or failed, shapes, NaN/Inf, "
                            "checksums, changed source files, provenance, texts. Exit 0 = sound, 1 = problems.")
def verify_cmd(
    cache: Path = typer.Option(..., "--cache", help=_CACHE_HELP),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Manifest (default: the dataset named in the shards)."),
    model: Optional[str] = typer.Option(None, "--model", help=_FIND),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help=_FIND),
    split: Optional[str] = typer.Option(None, "--split", help="Only videos of this split."),
    shard_index: Optional[int] = typer.Option(None, "--shard-index", help="Only this rank's videos."),
    num_shards: Optional[int] = typer.Option(None, "--num-shards", help="Expected number of shards."),
    quick: bool = typer.Option(False, "--quick", help="Skip the per-video checksums (reads metadata only, "
                                                      "plus the NaN scan)."),
    video_root: Optional[Path] = typer.Option(None, "--video-root", help="Report videos whose file changed since "
                                                                         "extraction (default: the last run's root)."),
):
    from cmdcl_cache.cache.verify import verify

    folder = _locate(cache, dataset, model, pretrained)
    try:
        report = verify(folder, dataset, split, shard_index, num_shards, quick=quick, video_root=video_root)
    except (CacheError, ValueError) as err:   # an unknown --split, a --shard-index the cache does not have
        _fail(str(err))
    out = console()
    out.print(f"{folder}: {report.committed} of {report.expected} videos committed, "
              f"{len(report.failed)} listed as failed, {report.frames} frames"
              + ("" if report.checked_sums else " (checksums not checked: --quick)"), markup=False)
    if report.problems:
        out.print(f"[red]{len(report.problems)} problem(s):[/red]")
        for prob in report.problems:
            out.print(f"  - {prob}", markup=False)
        raise typer.Exit(1)
    out.print("[green]ok[/green]")


@app.command("inspect", help="Summarise a cache: provenance, videos, frames, shards, texts, failures by stage.")
def inspect_cmd(
    cache: Path = typer.Option(..., "--cache", help=_CACHE_HELP),
    dataset: Optional[str] = typer.Option(None, "--dataset", help=_FIND),
    model: Optional[str] = typer.Option(None, "--model", help=_FIND),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help=_FIND),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    import json

    from cmdcl_cache.cache.verify import render_summary, summarize

    s = summarize(_locate(cache, dataset, model, pretrained))
    if as_json:
        print(json.dumps(s, indent=1, default=str))
    else:
        render_summary(s, console())
    if s["unreadable"]:
        raise typer.Exit(1)


@app.command("export-npy", help="Write each cached video's features [T, D] with its timestamps and fps, in "
                                 "video_features' layout (<name>.npy, <name>_timestamps_ms.npy, <name>_fps.npy, or "
                                 "one <name>.npz), and index.jsonl mapping every video id to its file names (ids "
                                 "that are not safe file names get '<prefix>~<sha256>'; see "
                                 "cmdcl_cache/ingest/export.py).")
def export_cmd(
    cache: Path = typer.Option(..., "--cache", help=_CACHE_HELP),
    out: Path = typer.Option(..., "--out", help="Folder for the exported files."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help=_FIND),
    model: Optional[str] = typer.Option(None, "--model", help=_FIND),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help=_FIND),
    dtype: str = typer.Option("float16", "--dtype", help="float16 (as stored) or float32."),
    layout: str = typer.Option("npy", "--format", help="npy: three .npy files per video; npz: one .npz per video."),
):
    from cmdcl_cache.ingest.export import export_npy

    try:
        n = export_npy(_locate(cache, dataset, model, pretrained).path, out, dtype=dtype, layout=layout)
    except (CacheError, ValueError, TypeError, OSError) as err:
        _fail(str(err), 2)
    print(f"wrote {n} videos to {out} (index.jsonl maps video ids to file names)")


if __name__ == "__main__":
    app()
