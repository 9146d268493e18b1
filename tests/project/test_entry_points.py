"""`python -m cmdcl_cache` and `python -m cmdcl_heads` are the two programs, for where the scripts are not on PATH."""

import subprocess
import sys

import pytest

from _extract_util import REPO

pytestmark = pytest.mark.slow   # three fresh Python processes per program


@pytest.mark.parametrize("package, prog, command", [("cmdcl_cache", "cmdcl-cache", "extract"),
                                                    ("cmdcl_heads", "cmdcl-heads", "train")])
def test_python_dash_m_runs_the_program(package, prog, command):
    version = subprocess.run([sys.executable, "-m", package, "--version"], cwd=REPO, capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith(f"{prog} "), version.stderr
    usage = subprocess.run([sys.executable, "-m", package, command, "--help"], cwd=REPO, capture_output=True, text=True)
    assert usage.returncode == 0 and f"Usage: {prog} {command}" in usage.stdout, usage.stdout + usage.stderr
    wrong = subprocess.run([sys.executable, "-m", package, "no-such-command"], cwd=REPO, capture_output=True, text=True)
    assert wrong.returncode == 2 and "no-such-command" in wrong.stderr
