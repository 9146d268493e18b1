"""`cmdcl-heads`: confounder dictionaries, training, evaluation and prediction on cached features."""

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train and evaluate heads (baselines and CMDCL) on cached CLIP features.")
confounders_app = typer.Typer(no_args_is_help=True, help="Confounder dictionaries built with FAISS k-means.")
app.add_typer(confounders_app, name="confounders")


if __name__ == "__main__":
    app()
