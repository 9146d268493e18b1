"""Fixtures shared by the test folders. The helper modules beside this file (_extract_util, _heads_synth,
_cmdcl_synth, _video_runs) are imported by their top-level names: pyproject.toml puts tests/ on the path,
and subprocesses that need them (CMDCL_DECODER=_extract_util:slow_decord) get REPO/tests on PYTHONPATH."""

import pytest

from _extract_util import REPO
from _heads_synth import make_synthetic

SHARED = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared():
    """The public annotation files of COIN and Breakfast that the dataset builders are tested on."""
    missing = [SHARED / name for name in ("coin", "breakfast") if not (SHARED / name).is_dir()]
    if missing:
        pytest.fail(
            f"not found: {', '.join(map(str, missing))}. The builder tests read the public annotation files of "
            "COIN (taxonomy, the public derivatives of COIN.json) and Breakfast (mapping.txt, split bundles, "
            "ViS4mer CSVs, ground truth) from shared/datasets/ beside the clone; each folder's PROVENANCE.md "
            "names the public repository, commit and sha256 of every file. Clone the project next to that "
            "folder (CI does); manifests/README.md says how the manifests are built from it.", pytrace=False)
    return SHARED


@pytest.fixture(scope="module")
def synth_options():
    """Keyword arguments of make_synthetic for this module's `synth`; a module overrides it to change them."""
    return {}


@pytest.fixture(scope="module")
def synth(synth_options, tmp_path_factory):
    """The heads tests' synthetic cache and manifest (tests/_heads_synth.py): (cache folder, manifest folder),
    one per module, so that a module may change its files."""
    return make_synthetic(tmp_path_factory.mktemp("synth"), **synth_options)
