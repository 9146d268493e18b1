"""SIGKILL at several moments, then resume: the cache verifies and its shard has the same bytes as a run
that was never interrupted. The extraction runs as `python -m cmdcl_cache.cli extract` in its own process
group, and the whole group (main process and decode workers) is killed, like a machine that goes down."""

import hashlib
import os
import random
import shutil
import signal
import subprocess
import time

import pytest

from _extract_util import PY, REPO, TINY, extract_args, good_videos, write_manifest
from cmdcl_cache.extract.pipeline import ExtractConfig, extract
from cmdcl_cache.cache.folder import Cache
from cmdcl_cache.cache.verify import verify

pytestmark = pytest.mark.slow


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _start(args):
    # The slowed decoder spaces the commits out (0.15 s per chunk), so that a poll every 2 ms sees each
    # count; with plain decord the last videos can commit and finalize between two polls.
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
           "CMDCL_DECODER": "_extract_util:slow_decord"}
    return subprocess.Popen([PY, "-m", "cmdcl_cache.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _kill_when(proc, condition, timeout=120):
    """SIGKILL the process group as soon as condition() holds; False if the run ended first."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("condition never held")


def _commits(folder):
    log = folder / "frames-00000-of-00001.journal" / "commits.jsonl"
    try:
        return log.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_sigkill_at_any_moment_then_resume_gives_the_same_bytes(tmp_path):
    root = tmp_path / "videos"
    vids = good_videos(root, 6, frames=40)
    manifest = write_manifest(tmp_path / "manifest", vids)
    extra = ("--min-frames", "4", "--max-frames", "6", "--batch-size", "3")

    # The reference, never interrupted (in-process: same code, no second interpreter start-up), decoded by
    # decord as the killed runs' test seam is; the resumed runs give no --decoder and keep the recorded one.
    def opts(cache, decoder=None):
        return ExtractConfig(dataset=str(manifest), video_root=str(root), cache=str(cache), batch_size=3, workers=2,
                             fps=1, min_frames=4, max_frames=6, quiet=True, decoder=decoder, **TINY)
    ref = extract(opts(tmp_path / "ref", "decord"))
    assert ref.exit_code == 0
    shard_ref = ref.shard

    cache = tmp_path / "cut"
    folder = cache / "tiny" / "cmdcl-tiny-none"
    shard = folder / "frames-00000-of-00001.h5"
    journal = shard.with_suffix(".journal")
    args = extract_args(manifest, root, cache, *extra)
    delay = random.Random(0).uniform(0.0, 0.3)

    # 1: at a random instant after the first commit (mid-decode, mid-encode or mid-append)
    first = []
    def after_first_commit():
        if not first and _commits(folder) >= 1:
            first.append(time.monotonic())
        return bool(first) and time.monotonic() - first[0] >= delay
    assert _kill_when(_start(args), after_first_commit)
    n1 = _commits(folder)
    # 2: late in the resumed run, with two videos left
    assert _kill_when(_start(args), lambda: _commits(folder) >= len(vids) - 2)
    assert n1 < len(vids) - 2 or n1 == _commits(folder)
    saved = tmp_path / "saved-journal"
    shutil.copytree(journal, saved)
    # 3: resume to the end (in-process: the killed runs were the separate processes that matter)
    assert extract(opts(cache)).exit_code == 0
    assert _sha(shard) == _sha(shard_ref)
    assert verify(folder, str(manifest)).problems == []
    assert not journal.exists() and not shard.with_suffix(".h5.tmp").exists()

    # 4: a crash between finalize's atomic rename and the journal's removal leaves both: resume is a no-op
    # on the data and gives the same bytes again.
    shutil.copytree(saved, journal)
    assert extract(opts(cache)).exit_code == 0
    assert _sha(shard) == _sha(shard_ref) and not journal.exists()
    assert Cache(folder).video_ids == sorted(vids)
