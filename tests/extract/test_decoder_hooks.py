"""Decoder hooks (entry-point group cmdcl_cache.decoder_hooks): what an installed package may do and may not.

A hook takes over the default decoder only, and says so; a built-in backend named with --decoder is never
taken over; a hook that cannot be loaded, fails or answers nonsense stops the command naming the hook and
its package, exit 2, before anything is written.
"""

import itertools
import logging
import os

import pytest
from typer.testing import CliRunner

from _extract_util import extract_args, good_videos, write_manifest
from cmdcl_cache.cli import app
from cmdcl_cache.extract import decode
from cmdcl_cache.extract.decoders import BackendMissing
from cmdcl_cache.extract.decoders.pyav_video import PyAVVideo

MODULES = itertools.count()   # a new module name per installation: Python keeps the modules it imported

HOOK_OK = '''
from cmdcl_cache.extract.decoders.decord_video import DecordVideo

def opener(path, threads=1):
    return DecordVideo(path, threads)

def hook(name):
    return (opener, "decord") if name is None else None
'''


@pytest.fixture
def install_hook(tmp_path, monkeypatch):
    """Install a package `hookpkg` whose entry point `mine` is a new module's `hook`, of the given source."""
    monkeypatch.delenv("CMDCL_DECODER", raising=False)   # the tests' own hook stays silent

    def install(source: str, value: str = "hook", package: str = "hookpkg", name: str = "mine"):
        module = f"hookmod{next(MODULES)}"
        site = tmp_path / f"site-{module}"
        info = site / f"{package}-0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0\n")
        (info / "entry_points.txt").write_text(f"[cmdcl_cache.decoder_hooks]\n{name} = {module}:{value}\n")
        (site / f"{module}.py").write_text(source)
        monkeypatch.syspath_prepend(str(site))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
        decode._hooks.cache_clear()

    yield install
    decode._hooks.cache_clear()


def test_a_hook_takes_over_the_default_only_and_says_so(install_hook, caplog):
    install_hook(HOOK_OK)
    assert decode.resolve_decoder(None).opener.__name__ == "opener"
    assert decode.resolve_decoder("pyav") is PyAVVideo           # a backend named by the user is never taken over
    with caplog.at_level(logging.WARNING, logger="cmdcl_cache"):
        decode.check_decoders(None, "none")
    assert "decoder hook 'mine'" in caplog.text and "hookpkg 0" in caplog.text and "recorded as decord" in caplog.text
    assert decode.decoder_provenance(None, "none").startswith("decord")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cmdcl_cache"):
        decode.check_decoders("pyav", "none")
    assert "decoder hook" not in caplog.text


@pytest.mark.parametrize("source, value, said", [
    ("import no_such_module\ndef hook(name):\n    return None\n", "hook", "cannot be loaded (ModuleNotFoundError"),
    ("hook = 3\n", "hook", "is not a function"),
    ("def hook(name):\n    raise RuntimeError('boom')\n", "hook", "failed for decoder None (RuntimeError: boom)"),
    ("def hook(name):\n    return 'garbage'\n", "hook", "answered 'garbage'"),
    ("def hook(name):\n    return (print, 'frobnicator')\n", "hook", "expected None or (opener, backend)"),
    ("def hook(name):\n    return ('not callable', 'decord')\n", "hook", "expected None or (opener, backend)"),
    ("import sys\ndef hook(name):\n    sys.exit(0)\n", "hook", "failed for decoder None (SystemExit: 0)"),
    ("import sys\nsys.exit('bye')\n", "hook", "cannot be loaded (SystemExit: bye)"),
])
def test_a_broken_hook_is_named_with_its_package(install_hook, source, value, said):
    install_hook(source, value)
    with pytest.raises(BackendMissing) as err:
        decode.check_decoders(None)
    assert "decoder hook 'mine'" in str(err.value) and "hookpkg 0" in str(err.value) and said in str(err.value)


def test_extract_with_a_broken_hook_exits_2_naming_it_and_writes_nothing(install_hook, tmp_path):
    install_hook("def hook(name):\n    raise RuntimeError('boom')\n")
    root = tmp_path / "videos"
    manifest = write_manifest(tmp_path / "manifest", good_videos(root, 1))
    res = CliRunner().invoke(app, extract_args(manifest, root, tmp_path / "cache"))
    assert res.exit_code == 2, res.output
    assert "decoder hook 'mine'" in res.output and "boom" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "cache").exists()


HOOK_MAIN_ONLY = '''
import multiprocessing
from cmdcl_cache.extract.decoders.decord_video import DecordVideo

class Plain:   # a video object without a `backend` attribute
    def __init__(self, video):
        self.video = video
        self.num_frames, self.fps = video.num_frames, video.fps

    def get_batch(self, indices):
        return self.video.get_batch(indices)

    def __getattr__(self, name):
        if name == "backend":
            raise AttributeError(name)
        return getattr(self.video, name)

def opener(path, threads=1):
    return Plain(DecordVideo(path, threads))

def hook(name):
    if multiprocessing.current_process().name != "MainProcess":
        raise RuntimeError("asked in a decode worker")
    return (opener, "decord") if name is None else None
'''


def test_workers_decode_with_what_the_main_process_decided(install_hook, tmp_path):
    """The workers get the hook's opener; they never ask the hooks (which could answer otherwise), and each
    video is recorded as the backend the hook declared, whatever its video object says."""
    from cmdcl_cache.cache.folder import Cache

    install_hook(HOOK_MAIN_ONLY)
    root = tmp_path / "videos"
    videos = good_videos(root, 2)
    res = CliRunner().invoke(app, extract_args(write_manifest(tmp_path / "manifest", videos), root,
                                               tmp_path / "cache", "--workers", "1"))
    assert res.exit_code == 0, res.output
    cache = Cache(next((tmp_path / "cache").glob("*/*")))
    assert [cache.video_info(v)["decoder"] for v in sorted(videos)] == ["decord"] * 2


def test_two_hooks_that_answer_are_an_error_naming_both(install_hook):
    install_hook(HOOK_OK, package="firstpkg", name="first")
    install_hook(HOOK_OK, package="secondpkg", name="second")
    with pytest.raises(BackendMissing) as err:
        decode.check_decoders(None)
    assert "two decoder hooks" in str(err.value) and "firstpkg" in str(err.value) and "secondpkg" in str(err.value)


def test_an_opener_that_cannot_reach_the_workers_is_refused_before_they_start(install_hook):
    install_hook("def hook(name):\n    return (lambda path, threads=1: None, 'decord')\n")
    with pytest.raises(BackendMissing, match="cannot be sent to the decode workers"):
        decode.worker_decoder(None)
