"""`python -m cmdcl_heads`: the `cmdcl-heads` program, for where the console script is not on PATH."""

from cmdcl_heads.cli import app

app(prog_name="cmdcl-heads")
