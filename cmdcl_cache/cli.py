"""`cmdcl-cache`: build manifests, make the demo set, extract CLIP features into HDF5 shards."""

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Build manifests, render the demo set, and cache CLIP features of videos in HDF5.")
manifest_app = typer.Typer(no_args_is_help=True, help="Build and check dataset manifests.")
demo_app = typer.Typer(no_args_is_help=True, help="The offline demo set of rendered videos.")
app.add_typer(manifest_app, name="manifest")
app.add_typer(demo_app, name="demo")


if __name__ == "__main__":
    app()
