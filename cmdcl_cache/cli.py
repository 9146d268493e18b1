"""`cmdcl-cache`: build manifests, make the demo set, extract CLIP features into HDF5 shards."""

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Build manifests, render the demo set, and cache CLIP features of videos in HDF5.")
manifest_app = typer.Typer(no_args_is_help=True, help="Build and check dataset manifests.")
demo_app = typer.Typer(no_args_is_help=True, help="The offline demo set of rendered videos.")
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
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cmdcl_cache.demo import check_size_fps, make_demo

    frame_size = _parse_size(size)
    try:  # before the progress bar, so that a typo fails at once
        check_size_fps(frame_size, fps)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    console = Console()
    with Progress(TextColumn("rendering"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("render", total=None)

        def step(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            manifest_dir = make_demo(out, train, val, test, seed=seed, size=frame_size, fps=fps,
                                     own_share=own_share, progress=step)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    console.print(f"manifest: {manifest_dir}")
    video_root = out / "videos"
    env = "" if manifest_dir.resolve() == Path("demo/manifest").resolve() else f"CMDCL_DEMO={manifest_dir} "
    console.print(f"next: {env}cmdcl-cache extract --dataset demo --video-root {video_root} --cache cache "
                  "--model cmdcl-tiny --pretrained none", soft_wrap=True)


@manifest_app.command("build")
def manifest_build(
    dataset: str = typer.Option(..., "--dataset", help="Which builder: coin, breakfast or charades."),
    annotations: Path = typer.Option(..., "--annotations", exists=True,
                                     help="Annotation folder (shared/datasets/<name>, your Charades folder) "
                                          "or, for COIN, an official COIN.json with the taxonomy CSVs beside it."),
    out: Optional[Path] = typer.Option(None, "--out", help="Manifest folder to write (default: the built-in "
                                                           "location manifests/<dataset>, where load_manifest finds it)."),
):
    """Build a manifest (videos.jsonl + labels.json) from a dataset's annotation files."""
    from rich.console import Console

    from cmdcl_cache.datasets import BUILDERS, build_manifest
    from cmdcl_cache.manifest import ManifestError, resolve_dataset_dir

    if dataset not in BUILDERS:
        raise typer.BadParameter(f"no builder for {dataset!r}; choose one of {', '.join(BUILDERS)}",
                                 param_hint="--dataset")
    out = out or resolve_dataset_dir(dataset)
    try:
        m = build_manifest(dataset, annotations, out)
    except ManifestError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}", markup=True, highlight=False)
        raise typer.Exit(2)
    sizes = ", ".join(f"{n} {len(ls)}" for n, ls in m.label_sets.items())
    splits = ", ".join(f"{s} {len(m.select(s))}" for s in ("train", "val", "test") if m.select(s))
    Console().print(f"wrote {out}: {len(m.videos)} videos; label sets: {sizes}; {splits}", highlight=False)


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
    from rich.console import Console
    from rich.table import Table

    from cmdcl_cache.manifest import ManifestError, load_manifest
    from cmdcl_cache.paths import check_videos

    console = Console()
    try:
        m = load_manifest(dataset)
    except ManifestError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}", markup=True, highlight=False)
        raise typer.Exit(2)
    result = check_videos(m.videos, video_root)
    table = Table(title=f"{m.dataset}: {len(m.videos)} videos under {video_root}")
    for col in ("status", "videos", "train", "val", "test"):
        table.add_column(col, justify="left" if col == "status" else "right")
    split_of = {v.video_id: v.split for v in m.videos}
    for status in ("found", "missing", "ambiguous"):
        ids = [x if isinstance(x, str) else x[0] for x in result[status]]
        counts = [sum(split_of[i] == s for i in ids) for s in ("train", "val", "test")]
        table.add_row(status, str(len(ids)), *map(str, counts))
    console.print(table)
    for status in ("missing", "ambiguous"):
        items = result[status]
        if not items:
            continue
        console.print(f"{status} ({len(items)}{', first ' + str(show) if len(items) > show else ''}):")
        for item in items[:show]:
            console.print(f"  {item}" if isinstance(item, str) else f"  {item[0]}: {', '.join(item[1])}",
                          highlight=False, markup=False)
    if missing_out is not None:
        missing_out.write_text("".join(i + "\n" for i in result["missing"]), encoding="utf-8")
    if result["ambiguous"] or (result["missing"] and not allow_missing):
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------- feature cache

_FATAL_HELP = "Exit status: 0 every selected video is in the cache, 1 some failed (listed in failures.jsonl; the cache holds the others), 2 nothing extracted or a fatal error."


def _fail(message: str, code: int = 2):
    from rich.console import Console
    from rich.markup import escape   # the message is text: "pip install 'cmdcl[torchcodec]'" is no markup
    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command("extract", help="Decode, sample and encode a dataset's videos into HDF5 shards (resumable).",
             epilog=_FATAL_HELP)
def extract_cmd(
    dataset: str = typer.Option(..., "--dataset", help="Built-in manifest (coin, breakfast, charades, demo) or a manifest folder."),
    video_root: Path = typer.Option(..., "--video-root", help="Folder the manifest's video paths are relative to."),
    cache: Path = typer.Option(..., "--cache", help="Cache root; features go to <cache>/<dataset>/<model tag>/."),
    model: str = typer.Option("ViT-B-16", "--model", help="open_clip model name (cmdcl-tiny for tests)."),
    pretrained: str = typer.Option("openai", "--pretrained", help="open_clip weight tag, a checkpoint file, or none (random, seeded)."),
    precision: str = typer.Option("fp16", "--precision", help="fp32, fp16 or bf16 (autocast on CUDA; CPU computes in fp32)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda (cuda:LOCAL_RANK under torchrun/Slurm) or cuda:N."),
    fps: float = typer.Option(1.0, "--fps", help="Sampled frames per second of video (rate mode)."),
    min_frames: int = typer.Option(8, "--min-frames", help="Rate mode: at least this many frames (never more than the video has)."),
    max_frames: int = typer.Option(4096, "--max-frames", help="Rate mode: at most this many frames per video."),
    num_frames: Optional[int] = typer.Option(None, "--num-frames", help="Exactly N frames per video, uniform (repeats frames of very short videos)."),
    keyframes_only: bool = typer.Option(False, "--keyframes-only", help="Each sample is the keyframe nearest its bin centre: one decoded frame per sample, up to half a keyframe interval from the uniform time (stored timestamps are exact)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Frames per encoder batch, gathered across videos."),
    workers: int = typer.Option(4, "--workers", help="Decode worker processes."),
    decode_timeout: float = typer.Option(120.0, "--decode-timeout", help="Seconds without decode progress after which a worker is killed and its video failed."),
    split: Optional[str] = typer.Option(None, "--split", help="Only videos of this split (train, val, test); default all."),
    shard_index: Optional[int] = typer.Option(None, "--shard-index", help="This process's shard (default: from torchrun/Slurm, else 0)."),
    num_shards: Optional[int] = typer.Option(None, "--num-shards", help="Number of shards (default: from torchrun/Slurm, else 1)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Only the videos listed in failures.jsonl that are not committed."),
    tokens: str = typer.Option("cls", "--tokens", help="cls: one feature per frame; grid: also a pooled patch grid."),
    grid: int = typer.Option(4, "--grid", help="Side of the pooled patch grid with --tokens grid."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", exists=True, dir_okay=False, help="Prompt templates file for texts.h5 (one template with {} a line)."),
    quiet: bool = typer.Option(False, "--quiet", help="Log lines instead of a progress bar (for batch jobs)."),
    decoder: Optional[str] = typer.Option(None, "--decoder", help="Decoder backend: decord (default), pyav, torchcodec (CPU) or torchcodec-cuda (NVDEC; frames resized on the GPU). Checked before any work."),
    fallback_decoder: str = typer.Option("pyav", "--fallback-decoder", help="Tried when --decoder refuses a file (decord refuses 90/270-degree rotated videos): pyav or none."),
):
    from rich.console import Console

    from cmdcl_cache.pipeline import ExtractOptions, extract, main_exit_message
    from cmdcl_cache.sampling import SamplingPolicy

    try:
        policy = SamplingPolicy(fps=fps, min_frames=min_frames, max_frames=max_frames, num_frames=num_frames,
                                keyframes_only=keyframes_only)
        opts = ExtractOptions(dataset=dataset, video_root=video_root, cache=cache, model=model,
                              pretrained=pretrained, precision=precision, device=device, policy=policy,
                              batch_size=batch_size, workers=workers, decode_timeout=decode_timeout,
                              split=split, shard_index=shard_index, num_shards=num_shards,
                              retry_failed=retry_failed, tokens=tokens, grid=grid, prompts=prompts, quiet=quiet,
                              decoder=decoder, fallback_decoder=fallback_decoder)
        result = extract(opts)
    except KeyboardInterrupt:
        _fail("interrupted; rerun the same command to resume", 2)
    except (ValueError, RuntimeError, OSError) as err:  # manifest, ranks, encoder, store, options
        _fail(str(err), 2)
    Console(stderr=True, highlight=False).print(main_exit_message(result), markup=False)
    print(result.cache_dir)
    raise typer.Exit(result.exit_code)


@app.command("texts", help="(Re)write texts.h5: prompt-ensembled text embeddings of every label set.")
def texts_cmd(
    dataset: str = typer.Option(..., "--dataset", help="Built-in manifest or a manifest folder."),
    cache: Path = typer.Option(..., "--cache", help="Cache root (or the cache folder itself)."),
    model: str = typer.Option("ViT-B-16", "--model", help="open_clip model name."),
    pretrained: str = typer.Option("openai", "--pretrained", help="Weight tag, checkpoint file, or none."),
    precision: str = typer.Option("fp16", "--precision", help="fp32, fp16 or bf16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    tokens: str = typer.Option("cls", "--tokens", help="Which cache folder: cls or grid (as extracted)."),
    grid: int = typer.Option(4, "--grid", help="Grid side, with --tokens grid."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", exists=True, dir_okay=False, help="Prompt templates file."),
    force: bool = typer.Option(False, "--force", help="Rewrite even when texts.h5 has the same provenance."),
):
    from cmdcl_cache.encoder import EncoderSpec
    from cmdcl_cache.manifest import load_manifest
    from cmdcl_cache.pipeline import cache_folder, ensure_texts, load_encoder_seeded

    try:
        m = load_manifest(dataset)
        folder = cache if (cache / "texts.h5").exists() or any(cache.glob("frames-*")) else \
            cache_folder(cache, m.dataset, model, pretrained, tokens, grid)
        enc = load_encoder_seeded(EncoderSpec(model=model, pretrained=pretrained, precision=precision,
                                              device=device, tokens=tokens, grid=grid))
        path, written = ensure_texts(folder, m, enc, prompts, force=force)
    except (ValueError, RuntimeError, OSError) as err:
        _fail(str(err), 2)
    print(f"{'wrote' if written else 'up to date:'} {path}")


def _cache_dir(cache, dataset, model, pretrained):
    from cmdcl_cache.verify import find_cache_dir
    try:
        return find_cache_dir(cache, dataset, model, pretrained)
    except (ValueError, RuntimeError, OSError) as err:
        _fail(str(err), 2)


@app.command("verify", help="Check a cache: every selected video committed once or failed, shapes, NaN/Inf, provenance, texts.")
def verify_cmd(
    cache: Path = typer.Option(..., "--cache", help="Cache folder, or the root with --dataset/--model/--pretrained."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Manifest (default: the dataset named in the shards)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model, to find the folder under a cache root."),
    pretrained: Optional[str] = typer.Option("openai", "--pretrained", help="Weights, to find the folder under a cache root."),
    split: Optional[str] = typer.Option(None, "--split", help="Only videos of this split."),
    shard_index: Optional[int] = typer.Option(None, "--shard-index", help="Only this rank's videos."),
    num_shards: Optional[int] = typer.Option(None, "--num-shards", help="Expected number of shards."),
):
    from rich.console import Console

    from cmdcl_cache.verify import verify

    folder = _cache_dir(cache, dataset, model, pretrained)
    report = verify(folder, dataset, split, shard_index, num_shards)
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"{folder}: {report.committed} of {report.expected} videos committed, "
                  f"{len(report.failed)} listed as failed, {report.frames} frames", markup=False)
    if report.problems:
        console.print(f"[red]{len(report.problems)} problem(s):[/red]")
        for prob in report.problems:
            console.print(f"  - {prob}", markup=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print("[green]ok[/green]")


@app.command("inspect", help="Summarise a cache: provenance, videos, frames, shards, texts, failures by stage.")
def inspect_cmd(
    cache: Path = typer.Option(..., "--cache", help="Cache folder, or the root with --dataset/--model/--pretrained."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="To find the folder under a cache root."),
    model: Optional[str] = typer.Option(None, "--model", help="To find the folder under a cache root."),
    pretrained: Optional[str] = typer.Option("openai", "--pretrained", help="To find the folder under a cache root."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    import json

    from rich.console import Console

    from cmdcl_cache.verify import render_summary, summarize

    s = summarize(_cache_dir(cache, dataset, model, pretrained))
    if as_json:
        print(json.dumps(s, indent=1, default=str))
    else:
        render_summary(s, Console(highlight=False))


@app.command("export-npy", help="Write one <video_id>.npy [T, D] per cached video.")
def export_cmd(
    cache: Path = typer.Option(..., "--cache", help="Cache folder, or the root with --dataset/--model/--pretrained."),
    out: Path = typer.Option(..., "--out", help="Folder for the .npy files."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="To find the folder under a cache root."),
    model: Optional[str] = typer.Option(None, "--model", help="To find the folder under a cache root."),
    pretrained: Optional[str] = typer.Option("openai", "--pretrained", help="To find the folder under a cache root."),
    dtype: str = typer.Option("float16", "--dtype", help="float16 (as stored) or float32."),
):
    from cmdcl_cache.export import export_npy
    from cmdcl_cache.store import CacheError

    try:
        n = export_npy(_cache_dir(cache, dataset, model, pretrained), out, dtype=dtype)
    except (CacheError, ValueError, TypeError) as err:
        _fail(str(err), 2)
    print(f"wrote {n} files to {out}")


if __name__ == "__main__":
    app()
