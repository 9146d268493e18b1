"""`python -m cmdcl_cache`: the `cmdcl-cache` program, for where the console script is not on PATH."""

from cmdcl_cache.cli import app

app(prog_name="cmdcl-cache")
