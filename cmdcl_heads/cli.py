"""`cmdcl-heads`: confounder dictionaries, training, evaluation and prediction on cached features."""

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train and evaluate heads (baselines and CMDCL) on cached CLIP features.")
confounders_app = typer.Typer(no_args_is_help=True, help="Confounder dictionaries built with FAISS k-means.")
app.add_typer(confounders_app, name="confounders")


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
    from cmdcl_cache.store import Cache, CacheError
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


if __name__ == "__main__":
    app()
