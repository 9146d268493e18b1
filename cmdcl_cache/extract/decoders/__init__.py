"""Video decoder backends behind `--decoder`: one small class per library, one contract for all.

A backend class is built as `Video(path, threads)` and gives:

    num_frames   frames in the video (the decoder's index, presentation order)
    fps          the decoder's average frame rate
    pts          float64 [num_frames]: presentation time of each frame, seconds (None: frames at i / fps)
    get_batch(indices) -> uint8 [k, H, W, 3] upright RGB frames (numpy; a CUDA tensor for torchcodec-cuda)
    decoded      frames the library has decoded so far, where it says (PyAV), else None

| backend          | library                 | where it runs                    | rotation metadata          |
|------------------|-------------------------|----------------------------------|----------------------------|
| pyav (default)   | PyAV (FFmpeg, bundled)  | worker processes, torch-free     | applied                    |
| decord           | decord                  | worker processes, torch-free     | 180 applied, 90/270 refused |
| torchcodec       | torchcodec + FFmpeg libs| worker processes (imports torch) | applied                    |
| torchcodec-cuda  | torchcodec, NVDEC       | threads of the main process      | applied                    |

`backend_version(name)` checks that a backend can run here (before any work) and raises BackendMissing
with what to install. Importing this package imports no decoder library and never torch. PyAV, the default
of new caches, decodes files whose timestamps do not tell the frames apart (AVI with B-frames, MPEG-TS / PS)
by position (pyav_video.py); decord, its default fallback, decodes those in order or refuses them; caches made before PyAV became the default record decord and are resumed with it (decode.run_decoders).
"""

from __future__ import annotations

import importlib

BACKENDS = ("decord", "pyav", "torchcodec", "torchcodec-cuda")
FALLBACKS = ("decord", "pyav", "none")

_CLASSES = {
    "decord": ("cmdcl_cache.extract.decoders.decord_video", "DecordVideo"),
    "pyav": ("cmdcl_cache.extract.decoders.pyav_video", "PyAVVideo"),
    "torchcodec": ("cmdcl_cache.extract.decoders.torchcodec_video", "TorchCodecVideo"),
    "torchcodec-cuda": ("cmdcl_cache.extract.decoders.torchcodec_video", "TorchCodecCudaVideo"),
}
_FFMPEG_LIBS = ("FFmpeg 4-8 shared libraries (Debian 12: apt-get install libavcodec59 libavformat59 "
                "libavutil57 libswscale6 libswresample4 libavdevice59 libavfilter8)")

INSTALL = {
    "decord": "pip install decord",
    "pyav": "pip install av",
    "torchcodec": f"pip install 'cmdcl[torchcodec]' (torchcodec matching your torch) and {_FFMPEG_LIBS}",
    "torchcodec-cuda": "pip install 'cmdcl[torchcodec]' on a machine with an NVIDIA GPU, torch built for "
                       f"CUDA, and {_FFMPEG_LIBS.replace('shared', 'shared (NVDEC-enabled)')}",
}


class BrokenFile(ValueError):
    """The file itself is wrong (cut short): no fallback is tried, another backend would read it as
    a shorter video."""


class BackendMissing(RuntimeError):
    """A decoder backend was asked for but cannot run here; the message says what to install."""


def backend_version(name: str) -> str:
    """'decord 0.6.0', 'pyav 18.1.0', ...: the backend's library and version; raises BackendMissing."""
    if name not in BACKENDS:
        raise BackendMissing(f"unknown --decoder {name!r}: choose one of {', '.join(BACKENDS)}")
    library = {"decord": "decord", "pyav": "av"}.get(name, "torchcodec")
    try:
        module = importlib.import_module(library)
    except Exception as err:  # noqa: BLE001 - torchcodec raises RuntimeError when FFmpeg is missing
        reason = " ".join(str(err).split())[:300]
        raise BackendMissing(f"--decoder {name} needs {library}, which cannot be imported here "
                             f"({type(err).__name__}: {reason}); install: {INSTALL[name]}") from None
    if name == "torchcodec-cuda":
        import torch
        if not torch.cuda.is_available():
            raise BackendMissing(f"--decoder torchcodec-cuda needs a CUDA GPU, and torch "
                                 f"{torch.__version__} sees none; install: {INSTALL[name]}")
    return f"{name} {getattr(module, '__version__', '?')}"


def video_class(name: str):
    """The backend's class (imports its library)."""
    if name not in _CLASSES:
        raise BackendMissing(f"unknown --decoder {name!r}: choose one of {', '.join(BACKENDS)}")
    module, attr = _CLASSES[name]
    return getattr(importlib.import_module(module), attr)
