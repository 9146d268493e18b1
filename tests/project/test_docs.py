"""The documentation site builds with `mkdocs build --strict` (a broken link or anchor fails it), its generated
pages cover what they describe, and no page speaks of issue numbers or sessions."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _extract_util import REPO

PAGES = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").rglob("*.md"))]
NO_MENTION = re.compile(r"\bissues?\s+#?\d+|\bsessions?\b|DESIGN\.md", re.I)   # the tracker, the work history
LINK = re.compile(r"\]\(([^)\s]+)\)")


def site_hook():
    spec = importlib.util.spec_from_file_location("cmdcl_site_hook", REPO / "docs" / "hooks" / "site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(config: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(out)],
                          cwd=config.parent, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_site_builds_strict_with_its_generated_pages(tmp_path):
    res = build(REPO / "mkdocs.yml", tmp_path / "site")
    assert res.returncode == 0, res.stderr[-4000:]
    site = tmp_path / "site"
    cli = (site / "reference" / "cli.html").read_text(encoding="utf-8")
    for command in ("cmdcl-cache extract", "cmdcl-cache manifest build", "cmdcl-heads train", "cmdcl-heads explain",
                    "cmdcl-heads confounders build"):
        assert f"Usage: {command} [OPTIONS]" in cli, command
    assert "--static-removal" in cli and "--decoder" in cli   # options of the configuration dataclasses
    modules = (site / "reference" / "modules.html").read_text(encoding="utf-8")
    assert "frozen dataclasses are the one source" in modules   # cmdcl_cache/config.py's docstring, rendered
    for name in site_hook().benchmark_pages((REPO / "BENCHMARKS.md").read_text(encoding="utf-8")):
        assert (site / "evidence" / f"{name}.html").is_file(), name
    assert "<h1" in (site / "evidence" / "study.html").read_text(encoding="utf-8")
    # every built page, the ones made from --help texts and docstrings included
    assert not [f"{page.relative_to(site)}: {m.group(0)}" for page in site.rglob("*.html")
                for m in NO_MENTION.finditer(page.read_text(encoding="utf-8"))]


@pytest.mark.slow
def test_a_broken_link_fails_the_build(tmp_path):
    for name in ("mkdocs.yml", "BENCHMARKS.md"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    for package in ("cmdcl_cache", "cmdcl_heads"):
        (tmp_path / package).symlink_to(REPO / package)
    page = tmp_path / "docs" / "guide" / "demo.md"
    page.write_text(page.read_text(encoding="utf-8") + "\nSee [the missing page](no-such-page.md).\n")
    res = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert res.returncode != 0 and "no-such-page.md" in res.stderr, res.stderr[-3000:]


def test_a_benchmarks_section_without_a_page_is_refused():
    hook = site_hook()
    pages = hook.benchmark_pages("# B\n\nintro\n\n<!-- page: one -->\n## One\ntext\n### Block\n")
    assert pages == {"one": "# One\ntext\n## Block\n"}
    with pytest.raises(Exception, match=r"B.md:3: section 'Two' has no '<!-- page: NAME -->'"):
        hook.benchmark_pages("<!-- page: one -->\n## One\n## Two\n", source="B.md")


def test_no_page_speaks_of_issue_numbers_or_sessions():
    found = [f"{p.relative_to(REPO)}:{n}: {m.group(0)!r}" for p in PAGES
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) for m in NO_MENTION.finditer(line)]
    assert not found, "\n".join(found)


def test_readme_links_point_at_files_of_the_repository():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in LINK.findall(text) if "://" not in t]
    assert len(targets) >= 10
    missing = [t for t in targets if not (REPO / t).exists()]
    assert not missing, missing


def test_the_demo_page_shows_the_commands_of_ci_demo():
    page = (REPO / "docs" / "guide" / "demo.md").read_text(encoding="utf-8")
    shown = page.split("```bash\n", 1)[1].split("```", 1)[0]
    script = {line.strip() for line in (REPO / ".ci" / "demo").read_text(encoding="utf-8").splitlines()}
    commands = [line.strip() for line in shown.splitlines() if line.strip() and not line.startswith("export")]
    assert len(commands) >= 10
    assert [c for c in commands if c not in script] == []
