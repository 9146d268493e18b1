"""`extract` with the decoder options: missing or unknown backends refused before any work, Ctrl-C, and
odd videos (variable frame rate, rotated) end to end into the cache."""

import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from _extract_util import (PY, REPO, TINY, default_sigint, extract_args, good_videos, run_cli, write_manifest,
                           write_timed_video)
from cmdcl_cache.extract.decoders import BackendMissing
from cmdcl_cache.cache.runlog import EXIT_OK
from cmdcl_cache.extract.pipeline import ExtractConfig, extract

from cmdcl_cache.cache.folder import Cache
from cmdcl_cache.cache.verify import verify


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    t = tmp_path_factory.mktemp("small")
    vids = good_videos(t / "videos", 2, frames=12)
    return t, write_manifest(t / "manifest", vids)


def _refused(small_set, tmp_path, *options, env=None):
    t, manifest = small_set
    r = run_cli(extract_args(manifest, t / "videos", tmp_path / "cache", *options), env_extra=env)
    assert r.returncode == 2, r.stderr
    assert not (tmp_path / "cache").exists()          # refused before any work
    assert "Traceback" not in r.stderr
    return " ".join(r.stderr.split())


@pytest.mark.slow
def test_missing_backend_is_refused_with_what_to_install(small_set, tmp_path):
    fake = tmp_path / "site"                           # a torchcodec that cannot be imported
    (fake / "torchcodec").mkdir(parents=True)
    (fake / "torchcodec" / "__init__.py").write_text("raise ImportError('libtorchcodec_core: no FFmpeg')\n")
    err = _refused(small_set, tmp_path, "--decoder", "torchcodec",
                   env={"PYTHONPATH": f"{fake}{os.pathsep}{REPO}"})
    assert "--decoder torchcodec needs torchcodec" in err and "pip install 'cmdcl[torchcodec]'" in err
    assert "no FFmpeg" in err and "libavcodec59" in err


def _refused_in_process(small_set, tmp_path, decoder=None, fallback="pyav"):
    t, manifest = small_set
    opts = ExtractConfig(dataset=str(manifest), video_root=str(t / "videos"), cache=str(tmp_path / "cache"),
                         quiet=True, decoder=decoder, fallback_decoder=fallback, **TINY)
    with pytest.raises(BackendMissing) as err:
        extract(opts)
    assert not (tmp_path / "cache").exists()
    return str(err.value)


def test_nvdec_without_a_gpu_is_refused(small_set, tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # this machine, or a GPU box's CPU run
    assert "needs a CUDA GPU" in _refused_in_process(small_set, tmp_path, "torchcodec-cuda")


def test_unknown_backend_is_refused_with_the_choices():
    # backends are choices of the configuration: refused when it is built, and at parse time on the CLI; a
    # "module:function" test seam is never accepted from a configuration (it would call any function)
    from typer.testing import CliRunner

    from cmdcl_cache.cli import app
    for field, value in (("decoder", "ffmpeg"), ("decoder", "os:truncate"), ("fallback_decoder", "decord2")):
        with pytest.raises(ValueError, match=f"{field} must be one of .*got '{value}'"):
            ExtractConfig(dataset="d", video_root="v", cache="c", **{field: value})
        res = CliRunner().invoke(app, ["extract", f"--{field.replace('_', '-')}", value])
        assert res.exit_code == 2 and f"'{value}' is not one of" in res.output


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_ctrl_c_prints_one_message_and_no_worker_traceback(tmp_path):
    root = tmp_path / "videos"
    vids = good_videos(root, 8, frames=40)
    manifest = write_manifest(tmp_path / "manifest", vids)
    commits = tmp_path / "cache" / "tiny" / "cmdcl-tiny-none" / "frames-00000-of-00001.journal" / "commits.jsonl"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
           "CMDCL_DECODER": "_extract_util:slow_decord"}
    proc = subprocess.Popen([PY, "-m", "cmdcl_cache.cli", *extract_args(manifest, root, tmp_path / "cache")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=default_sigint)
    t_end = time.monotonic() + 120
    while not (commits.exists() and commits.read_bytes()) and proc.poll() is None:
        assert time.monotonic() < t_end, "no commit within 120 s"
        time.sleep(0.01)
    workers = _children(proc.pid)
    assert proc.poll() is None and len(workers) >= 2, "the run ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)                 # what a terminal's Ctrl-C does: the whole group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert stderr.count("interrupted") == 1, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    time.sleep(0.5)
    assert not [w for w in workers if _alive(w)], "decode workers left running"


@pytest.mark.slow
def test_variable_rate_and_rotated_videos_are_cached_with_their_times(tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    vfr_ms = [100 * i for i in range(40)] + [4000 + 2000 * i for i in range(12)]
    write_timed_video(root / "vfr.mp4", vfr_ms)
    write_timed_video(root / "rotated.mp4", [40 * i for i in range(30)], size=(64, 48), rotation=90)
    manifest = write_manifest(tmp_path / "manifest", {"vfr": "vfr.mp4", "rotated": "rotated.mp4"})
    r = extract(ExtractConfig(dataset=str(manifest), video_root=str(root), cache=str(tmp_path / "cache"),
                              fps=0.5, min_frames=2, max_frames=100, batch_size=4, workers=2, quiet=True,
                              decoder="decord", **TINY))   # decord refuses the rotated one: its fallback takes it
    cache = Cache(r.cache_dir)
    assert cache.video_info("rotated")["decoder"].startswith("pyav")   # the backend that decoded it, per video
    assert cache.video_info("vfr")["decoder"].startswith("decord")
    assert r.exit_code == EXIT_OK and r.failed == []
    cache = Cache(r.cache_dir)
    idx, ts = cache.frame_info("vfr")
    np.testing.assert_allclose(ts, np.array(vfr_ms)[idx] / 1000, atol=1e-6)   # decoder times, not i / fps
    assert ts.max() > 20 and len(idx) == 13
    info = cache.video_info("vfr")
    assert info["num_source_frames"] == 52
    assert info["duration"] == pytest.approx(26.1) and info["fps"] == pytest.approx(52 / 26.1)
    assert cache.num_frames("rotated") == 2           # 1.2 s at 0.5 fps, min 2; decord refused, PyAV decoded
    assert verify(r.cache_dir, str(manifest)).problems == []
    with h5py.File(r.shard) as f:
        assert "decord" in f.attrs["decoder"] and "fallback pyav" in f.attrs["decoder"]


@pytest.mark.slow
def test_keyframes_only_extract_records_its_placement(tmp_path):
    from _extract_util import write_gop_video
    root = tmp_path / "videos"
    root.mkdir()
    write_gop_video(root / "gop.mp4", 200, 50)                  # 8 s, keyframes every 2 s
    manifest = write_manifest(tmp_path / "manifest", {"gop": "gop.mp4"})
    r = run_cli(extract_args(manifest, root, tmp_path / "cache", "--keyframes-only", "--max-frames", "8"))
    assert r.returncode == 0, r.stderr
    folder = Path(r.stdout.strip().splitlines()[-1])
    idx, ts = Cache(folder).frame_info("gop")
    assert list(idx) == [0, 50, 100, 150] and np.allclose(ts, [0, 2, 4, 6])
    with h5py.File(folder / "frames-00000-of-00001.h5") as f:
        assert "nearest-keyframe" in str(f.attrs["sampling"])
