"""README.md stays short and every command in it still runs as written: each shell block is either run here
on real clips (`<!-- run: NAME -->` before it) or says why it cannot be (`<!-- not-run: why -->`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _extract_util import REPO, copy_clip, write_video

README = REPO / "README.md"
SHELL = {"bash", "sh", "shell", "console"}
MARK = re.compile(r"^<!-- (run|not-run): (\S.*?) -->$")


def shell_blocks(text: str) -> list[tuple[int, str | None, str]]:
    """(line of the fence, the marker line before it or None, the block's text) for every shell block."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```") and fence[3:].strip():
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            if fence[3:].strip() in SHELL:
                before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
                blocks.append((i + 1, before if MARK.match(before) else None, "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return blocks


def test_readme_is_short_and_its_prose_lines_are_narrow():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200): move text into docs/"
    fenced, wide = False, []
    for number, line in enumerate(lines, 1):
        if line.strip().startswith("```"):
            fenced = not fenced
        elif not fenced and len(line) > 120:
            wide.append(f"README.md:{number}: {len(line)} characters")
    assert not wide, "\n".join(wide)


def test_every_readme_command_block_is_run_or_says_why_not():
    blocks = shell_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 3
    unmarked = [f"README.md:{line}" for line, mark, _ in blocks if mark is None]
    assert not unmarked, f"shell blocks without <!-- run: NAME --> or <!-- not-run: why -->: {unmarked}"
    runs = {MARK.match(mark).group(2).split()[0] for _, mark, _ in blocks if mark.startswith("<!-- run:")}
    assert runs == set(RUNNERS), f"blocks marked run: {runs}; run by this file: {set(RUNNERS)}"


def test_shell_block_parser_sees_markers_and_unmarked_blocks():
    text = "<!-- not-run: needs COIN -->\n```bash\nx\n```\n\n```bash\ny\n```\n```text\nz\n```\n"
    assert [(m is not None, b) for _, m, b in shell_blocks(text)] == [(True, "x"), (False, "y")]


def block(name: str) -> str:
    found = [b for _, mark, b in shell_blocks(README.read_text(encoding="utf-8"))
             if mark and mark.startswith(f"<!-- run: {name}")]
    assert len(found) == 1, f"{len(found)} README blocks marked run: {name}"
    return found[0]


def own_videos_folder(root: Path) -> None:
    """The folder README.md draws under "Your own videos": three classes, eight clips, one new file."""
    real = {"bikes": ["bikes.mp4", "bigbuckbunny.mp4"], "phone calls": ["carphone_distorted.mp4",
                                                                          "carphone_pristine.mp4"]}
    generated = {"bikes": ["ride.mp4"], "phone calls": ["call.mp4"], "static": ["static 1.mp4", "static 2.mp4"]}
    for cls in ("bikes", "phone calls", "static"):
        (root / "videos" / cls).mkdir(parents=True)
        for clip in real.get(cls, []):
            copy_clip(clip, root / "videos" / cls / clip)
        for seed, name in enumerate(generated[cls]):
            write_video(root / "videos" / cls / name, 24, seed=seed + 10 * len(cls))
    write_video(root / "new clip.mp4", 30, seed=99)


def test_the_guide_shows_the_readme_own_videos_block():
    guide = (REPO / "docs" / "guide" / "own-videos.md").read_text(encoding="utf-8")
    assert f"```bash\n{block('own-videos')}\n```" in guide


@pytest.mark.slow
def test_readme_own_videos_block_runs_as_written(tmp_path):
    own_videos_folder(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", block("own-videos")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    run = tmp_path / "runs" / "cmdcl"
    assert (run / "summary.json").is_file() and (run / "explain.png").stat().st_size > 0
    lines = (run / "predictions-files.jsonl").read_text().splitlines()   # predict --video never writes a split's file
    assert len(lines) == 1 and "new clip.mp4" in lines[0]
    assert "top-1" in res.stdout or "top1" in res.stdout, res.stdout[-2000:]   # eval printed its table


RUNNERS = {"own-videos": test_readme_own_videos_block_runs_as_written}
