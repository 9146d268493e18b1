"""`cmdcl-cache`: build manifests, make the demo set, extract CLIP features into HDF5 shards."""

from pathlib import Path

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
    console.print(f"next: {env}cmdcl-cache extract demo --video-root {video_root}", soft_wrap=True)


if __name__ == "__main__":
    app()
