"""mkdocs hook: the pages that are generated, so that they cannot fall behind what they describe.

- `evidence/NAME.md`: one page per `##` section of BENCHMARKS.md (the benchmark scripts rewrite their blocks
  there; the `<!-- page: NAME -->` line above a section names its page, headings move up one level).
- `reference/cli.md`: every command and option of `cmdcl-cache` and `cmdcl-heads`, read from the click
  commands that typer builds out of the configuration dataclasses (the same text as `--help`).
- `reference/modules.md`: every module's docstring, rendered by mkdocstrings (`::: module`).
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[2]
PAGE_MARK = re.compile(r"^<!-- page: ([a-z0-9-]+) -->$")
PACKAGES = ("cmdcl_cache", "cmdcl_heads")


def benchmark_pages(text: str, source: str = "BENCHMARKS.md") -> dict[str, str]:
    """{page name: markdown} from BENCHMARKS.md; a `##` section without a page line is an error."""
    pages: dict[str, list[str]] = {}
    current: list[str] | None = None
    fenced = False
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        mark = PAGE_MARK.match(line)
        if mark:
            if mark.group(1) in pages:
                raise PluginError(f"{source}:{number}: page '{mark.group(1)}' is named twice")
            current = pages[mark.group(1)] = []
            continue
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("## "):
            previous = lines[number - 2] if number >= 2 else ""
            if not PAGE_MARK.match(previous):
                raise PluginError(f"{source}:{number}: section {line[3:]!r} has no '<!-- page: NAME -->' line "
                                  "above it (and no page in mkdocs.yml's nav)")
        if current is None:
            continue   # the file's own introduction
        if not fenced and line.startswith("##"):
            line = line[1:]   # the page's title becomes its h1, its blocks' h3 its h2
        current.append(line)
    return {name: "\n".join(body).strip() + "\n" for name, body in pages.items()}


def _help_text(app, prog: str, args: list[str]) -> str:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [*args, "--help"], prog_name=prog, env={"COLUMNS": "110", "TERM": "dumb"})
    if result.exit_code != 0:
        raise PluginError(f"{' '.join(args)} --help failed: {result.output}")
    return result.output.rstrip()


def _command_markdown(app, cmd, prog: str, args: list[str], depth: int) -> list[str]:
    out = [f"{'#' * depth} `{' '.join([prog, *args])}`", "", "```text", _help_text(app, prog, args), "```", ""]
    for name in getattr(cmd, "commands", {}):
        out += _command_markdown(app, cmd.commands[name], prog, [*args, name], min(depth + 1, 4))
    return out


def cli_reference() -> str:
    import typer.main

    from cmdcl_cache.cli import app as cache_app
    from cmdcl_heads.cli import app as heads_app

    lines = ["# Command-line reference", "",
             "Generated when the site is built: each command's `--help`, as the installed programs print it",
             "(the options come from the configuration dataclasses, so this page cannot fall behind them).",
             "Every command built from a configuration also takes `--config FILE.toml`",
             "([the three things you hold](contracts.md)). `python -m cmdcl_cache` and `python -m cmdcl_heads`",
             "run the same programs.", ""]
    for prog, app in (("cmdcl-cache", cache_app), ("cmdcl-heads", heads_app)):
        lines += _command_markdown(app, typer.main.get_command(app), prog, [], 2)
    return "\n".join(lines) + "\n"


def modules_page() -> str:
    lines = ["# Modules", "",
             "Each module's own docstring, read from the source when the site is built: the one place that",
             "says what the module is for. Listed along the data flow, package by package.", ""]
    for package in PACKAGES:
        root = REPO / package
        lines += [f"## `{package}`", ""]
        names = sorted({".".join((package, *py.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
                        for py in root.rglob("*.py")
                        if not any(part.startswith("_") for part in py.relative_to(root).parts[:-1])
                        and (py.name == "__init__.py" or not py.name.startswith("_"))})
        for name in names:
            lines += [f"::: {name}", "    options:", "      members: false", "      show_root_heading: true",
                      "      show_root_full_path: true", "      heading_level: 3", ""]
    return "\n".join(lines) + "\n"


def _add(files, config, uri: str, content: str) -> None:
    if files.get_file_from_path(uri) is not None:
        raise PluginError(f"docs/{uri} exists, but the site generates it: remove the file")
    files.append(File.generated(config, uri, content=content))


def on_files(files, config):
    benchmarks = REPO / "BENCHMARKS.md"
    for name, body in benchmark_pages(benchmarks.read_text(encoding="utf-8")).items():
        _add(files, config, f"evidence/{name}.md",
             body + "\n---\nThis page is BENCHMARKS.md's section of the same title; the scripts in "
             "`benchmarks/` rewrite its measured blocks.\n")
    _add(files, config, "reference/cli.md", cli_reference())
    _add(files, config, "reference/modules.md", modules_page())
    return files
