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


if __name__ == "__main__":
    app()
