"""Packaging (issue 12): a wheel built from the sources, installed into a fresh virtual environment outside the
checkout (no editable install), finds its built-in manifests and model configs and runs the demo's first steps."""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from _extract_util import REPO

_IGNORE_ANYWHERE = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache", "*.whl", ".whl",
                                         ".gl")


def IGNORE(folder, names):   # noqa: N802 - a copytree ignore; run outputs only at the top (cmdcl_cache/cache/ is code)
    top = {"build", "runs", "cache", "demo"} & set(names) if Path(folder) == REPO else set()
    return set(_IGNORE_ANYWHERE(folder, names)) | top


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_finds_its_data_and_runs(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=IGNORE)      # the checkout itself is left untouched
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("cmdcl-*.whl"))
    import zipfile
    assert "cmdcl_heads/presets/paper.toml" in zipfile.ZipFile(wheel).namelist()   # `train --preset` data
    assert "LicenseFile" not in build.stderr and "deprecated" not in build.stderr.lower(), build.stderr

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    # the dependencies (torch, open_clip...) come from this environment's site-packages, read as a plain path:
    # its editable install of cmdcl is a .pth hook that a path added this way never runs
    (site / "zz-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}

    def run(*args):
        out = subprocess.run([str(py), *args], capture_output=True, text=True, cwd=work, env=env, timeout=300)
        assert out.returncode == 0, (args, out.stdout[-2000:], out.stderr[-2000:])
        return out.stdout

    where = run("-c", "import cmdcl_cache, cmdcl_heads; print(cmdcl_cache.__file__, cmdcl_heads.__file__)")
    assert all(p.startswith(str(site)) for p in where.split()), where
    (work / "videos").mkdir()
    table = run("-m", "cmdcl_cache.cli", "manifest", "check", "--dataset", "coin", "--video-root", "videos",
                "--allow-missing")
    assert "11827 videos" in table.replace(",", "")
    run("-m", "cmdcl_cache.cli", "demo", "make", "demo", "--train", "1", "--val", "0", "--test", "1")
    env["CMDCL_DEMO"] = str(work / "demo" / "manifest")
    run("-m", "cmdcl_cache.cli", "extract", "--dataset", "demo", "--video-root", "demo/videos", "--cache", "cache",
        "--model", "cmdcl-tiny", "--pretrained", "none", "--device", "cpu", "--fps", "2", "--workers", "1",
        "--quiet")
    summary = json.loads(run("-m", "cmdcl_cache.cli", "inspect", "--cache", "cache", "--json"))
    assert summary["videos"] == 8 and summary["provenance"]["model"] == "cmdcl-tiny"
    assert run("-m", "cmdcl_heads.cli", "--version").strip() == "cmdcl-heads 0.1.0"
