"""Decode sampled frames in worker processes, with a timeout that kills a worker stuck in native code.

Each worker is a `spawn`ed process (no fork of a process that holds torch threads) that takes one video at
a time over its own pipe and answers on its own pipe:

    ("meta", job, num_source_frames, fps, duration, frame_index, timestamps, backend)   after opening
    ("frames", job, start, uint8 [k, S, S, 3])                                  one chunk of sampled frames
    ("done", job)  |  ("error", job, stage, message)                            stage: open | decode

The protocol changed deliberately in two ways when backends came: "meta" ends with `backend`, and it is
sent after the first chunk has been decoded (a backend that refuses a file does so there, before anything
was sent, so that the fallback can take over). `backend` names the backend that decoded the video:
the one asked for (`--decoder`: for a new cache pyav, for a resumed one the backend it records) or, when
that one refused the file before sending a frame, the fallback (`--fallback-decoder`: decord for pyav;
pyav for the others, as decord refuses videos with a 90 or 270 degree display rotation). A video both
refuse fails with both reasons. Timestamps are the decoder's presentation times and sampling is uniform
in time (cache/sampling.py); `fps` and `duration` are those of `sampling.video_timing`.

Given the encoder's `TransformSpec` (the pipeline always gives it), a worker resizes and centre crops
each frame as open_clip's eval transform does, with PIL itself (`transform.resize_crop`, the very code
of the encoder's CPU path, so the pixels are open_clip's bit for bit) and sends uint8 crops of the
model's input size: 150 KB per frame at 224 x 224 instead of 0.7 MB (360p) to 6 MB (1080p) at full
resolution. Sending full frames made the main process the bottleneck: unpickling them and resizing
them there took longer than encoding. The main process only normalises and encodes. (decord's own
resize while decoding would be cheaper still, but its scaler, swscale, does not give PIL's pixels.)
Without a transform (benchmarks, tests) the frames are sent at full resolution. Workers of the decord
and PyAV backends import numpy, PIL and their decoder, never torch: start-up time and memory per worker.

Frames travel in chunks (32 frames; fewer for large frames, see `chunk_frames`, so that the decoded
full-resolution frames a worker holds stay under 64 MB), so memory stays bounded whatever the length of
the video: a worker decodes one chunk ahead and then blocks on its pipe until the main process
takes it. One pipe per worker, never a shared queue: a worker killed while it writes would leave a
shared queue's lock held and hang every other worker.

Timeout: a worker that shows no progress (no message) for `timeout` seconds of the main process's waiting
time is killed with SIGKILL and replaced; its video is recorded as failed at the stage it was in. Time the
main process spends encoding does not count (the worker may be blocked on its pipe then), and a long video
that keeps sending chunks never times out: the timeout catches hangs, not long videos.

Ctrl-C: workers ignore SIGINT (it is blocked while they start, so not even their start-up prints a
traceback); the main process gets the KeyboardInterrupt, and leaving the pool's `with` block ends them.

NVDEC (`--decoder torchcodec-cuda`): frames decoded on the GPU cannot travel through a pipe, so
`GpuDecodePool` decodes in threads of the main process, resizes and crops on the GPU (the encoder's
`resize_crop`, bit-identical to PIL) and hands the same messages to the pipeline, the crops copied to
host memory (150 KB a frame). `start_pool` picks the pool for the backend.

Decoder hooks: an installed package may provide decoders through the entry-point group
`cmdcl_cache.decoder_hooks`: a function (decoder name or None) -> (opener, backend) or None, where
`opener` is (path, threads) -> an object with `num_frames`, `fps`, `get_batch(indices)` and optionally
`pts` (see decoders/__init__.py), and `backend` the built-in backend whose name and version its
provenance records. A built-in backend named with --decoder is never taken over; a hook that takes over
the default is logged, and one that fails to load or answers otherwise (or two that both answer) stops
the command naming it and its package. Hooks are asked in the main process only: workers get the chosen
opener (`worker_decoder`), so they cannot answer otherwise. cmdcl installs none; the tests install
theirs (a decoder that hangs, one that is slow) from tests/, so no code is imported from a name in the
environment.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import pickle
import signal
import traceback
from dataclasses import dataclass

import numpy as np

from cmdcl_cache.cache.sampling import SamplingError, SamplingPolicy, sample_timing, video_timing
from cmdcl_cache.extract.decoders import BACKENDS, FALLBACKS, BackendMissing, BrokenFile, backend_version, video_class
from cmdcl_cache.extract.transform import TransformSpec, resize_crop

# Chunk boundaries decide which frames share an encoder batch, and a feature can differ in its last bit
# with its row in the batch (GEMM tail kernels): changing them changes shard bytes. Kept as they were.
CHUNK_FRAMES = 32
CHUNK_BYTES = 64 << 20   # at most this many bytes of decoded (full-resolution) frames per chunk
# New caches: PyAV, which skips the frames no sample needs (measured 1.3-2.3x decord per CPU second,
# BENCHMARKS.md "Decoder backends"), and decord for what PyAV refuses. A cache that
# records no decoder was made with the defaults before: decord, then PyAV.
DEFAULT_DECODER, LEGACY_DECODERS = "pyav", ("decord", "pyav")
DECODER_HOOKS = "cmdcl_cache.decoder_hooks"   # entry-point group of installed decoders (see above)


def default_fallback(decoder: str) -> str:
    """decord for PyAV, PyAV for every other backend (decord refuses 90 / 270 degree rotations)."""
    return "decord" if decoder == "pyav" else "pyav"


class DecodeError(RuntimeError):
    def __init__(self, stage: str, message: str, broken: bool = False):
        super().__init__(message)
        self.stage, self.broken = stage, broken   # broken: the file itself, no fallback tried


def chunk_frames(height: int, width: int, limit: int = CHUNK_FRAMES) -> int:
    return max(1, min(limit, CHUNK_BYTES // max(1, height * width * 3)))


@functools.cache
def _hooks() -> tuple:
    """(description, hook) of each installed decoder hook, loaded once per process."""
    hooks = []
    for entry in importlib.metadata.entry_points(group=DECODER_HOOKS):
        package = f"{entry.dist.name} {entry.dist.version}" if entry.dist else "an unknown package"
        where = f"decoder hook {entry.name!r} ({entry.value}, installed by {package})"
        try:
            hook = entry.load()
        except (Exception, SystemExit) as err:   # noqa: BLE001 - a package's failure is named, never a traceback
            raise BackendMissing(f"{where} cannot be loaded ({type(err).__name__}: {err}); fix or uninstall that "
                                 "package") from None
        if not callable(hook):
            raise BackendMissing(f"{where} is not a function; fix or uninstall that package")
        hooks.append((where, hook))
    return tuple(hooks)


def _hooked(name: str | None):
    """The opener of the installed hook that answers for `name`, or None. A built-in backend asked for by
    name is never taken over; two hooks that answer are an error, not a race."""
    if name in BACKENDS or not (name is None or isinstance(name, str)):
        return None
    answers = []
    for where, hook in _hooks():
        try:
            found = hook(name)
        except (Exception, SystemExit) as err:   # noqa: BLE001 - as above; a hook may not end the command
            raise BackendMissing(f"{where} failed for decoder {name!r} ({type(err).__name__}: {err})") from None
        if found is None:
            continue
        if not (isinstance(found, tuple) and len(found) == 2 and callable(found[0]) and found[1] in BACKENDS):
            raise BackendMissing(f"{where} answered {found!r:.80} for decoder {name!r}: expected None or "
                                 f"(opener, backend) with backend one of {', '.join(BACKENDS)}")
        answers.append(HookedOpener(*found, where))
    if len(answers) > 1:
        raise BackendMissing(f"two decoder hooks answer for decoder {name!r}: {answers[0].hook} and "
                             f"{answers[1].hook}; uninstall one, or name a built-in backend with --decoder")
    return answers[0] if answers else None


@dataclass(frozen=True)
class HookedOpener:
    """An installed hook's opener, the built-in backend its videos are recorded as, and which hook it is."""

    opener: object
    backend: str
    hook: str      # the entry point and the package that installed it, for messages

    def __call__(self, path: str, threads: int = 1):
        return self.opener(path, threads)


def worker_decoder(name: str | None):
    """What a decode worker is given: a built-in backend's name, or the opener of the hook that answered here.
    Workers never ask the hooks themselves: each would load them again and could answer otherwise."""
    hooked = _hooked(name)
    if hooked is None:
        return name or DEFAULT_DECODER
    try:
        pickle.dumps(hooked)
    except Exception as err:   # noqa: BLE001 - a lambda, a closure, a local class...
        raise BackendMissing(f"{hooked.hook}: its opener cannot be sent to the decode workers "
                             f"({type(err).__name__}: {err}); a hook's opener must be a module-level "
                             "function") from None
    return hooked


def resolve_decoder(name):
    """The function that opens a video, (path, threads) -> video: for a backend name, an installed hook's, or
    an opener given as it is (a function that can be pickled, as scripts and benchmarks pass their own)."""
    if callable(name):
        return name
    hooked = _hooked(name)
    if hooked is not None:
        return hooked
    name = name or DEFAULT_DECODER
    if name not in BACKENDS:
        raise ValueError(f"unknown decoder {name!r}: use one of {', '.join(BACKENDS)}")
    return video_class(name)


def _backend_of(decoder: str | None) -> str:
    hooked = _hooked(decoder)
    return hooked.backend if hooked is not None else decoder or DEFAULT_DECODER


def fallback_of(fallback: str | None, decoder: str | None) -> str | None:
    """The fallback's name, None for none; fallback None: the decoder's default fallback."""
    fallback = default_fallback(_backend_of(decoder)) if fallback is None else fallback
    return None if fallback == "none" else fallback


def check_decoders(decoder: str | None, fallback: str | None = None) -> None:
    """Before any work: BackendMissing (with what to install) unless both backends can run here."""
    if fallback not in (None, *FALLBACKS):
        raise BackendMissing(f"unknown --fallback-decoder {fallback!r}: choose one of {', '.join(FALLBACKS)}")
    hooked = _hooked(decoder)
    if decoder is not None and decoder not in BACKENDS and hooked is None:
        raise BackendMissing(f"unknown --decoder {decoder!r}: choose one of {', '.join(BACKENDS)}")
    if hooked is not None:
        logging.getLogger("cmdcl_cache").warning("decoding with %s, recorded as %s", hooked.hook, hooked.backend)
    for name in (_backend_of(decoder), fallback_of(fallback, decoder)):
        if name is not None:
            backend_version(name)


def decoder_provenance(decoder: str | None, fallback: str | None = None) -> str:
    """The shard's `decoder` attribute: the backends allowed to decode its videos, with versions."""
    text = backend_version(_backend_of(decoder))
    fb = fallback_of(fallback, decoder)
    return f"{text}; fallback {backend_version(fb)}" if fb and fb != _backend_of(decoder) else text


def decoders_of_provenance(text: str) -> tuple[str, str]:
    """(decoder, fallback) named by a `decoder_provenance` text, for decoding new files as the cache was.

    'torchcodec-cuda' becomes 'torchcodec': a file is decoded in this process, on the CPU; the same library
    (its NVDEC frames may differ from the CPU's in the last bits). An unknown or empty text gives the
    defaults of the caches that recorded none (decord, then PyAV).
    """
    decoder, fallback = _recorded(text) or LEGACY_DECODERS
    return ("torchcodec" if decoder == "torchcodec-cuda" else decoder), fallback


def _recorded(text: str) -> tuple[str, str] | None:
    """(decoder, fallback or "none") named by a `decoder_provenance` text; None if it names no backend."""
    first, _, rest = str(text or "").partition("; fallback ")
    decoder, fallback = first.split(" ")[0], (rest.split(" ")[0] if rest else "none")
    if decoder not in BACKENDS:
        return None
    return decoder, fallback if fallback in FALLBACKS else "none"


def run_decoders(decoder: str | None, fallback: str | None, recorded: str | None) -> tuple[str | None, str | None]:
    """(decoder, fallback) of an extract run: where --decoder is not given, those the cache being resumed or
    extended records (`recorded`, its `decoder` attribute), so that a cache made with decord before PyAV
    became the default goes on with decord; else those given, None standing for the defaults. An installed
    decoder hook that answers for the default stays in charge."""
    found = _recorded(recorded) if decoder is None and _hooked(None) is None else None
    if found is None:
        return decoder, fallback
    return found[0], found[1] if fallback is None else fallback


def error_message(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:500]}"


def crop_of(transform):
    """None (full frames), a TransformSpec or its dict (PIL's resize + crop), or a callable (GPU pool)."""
    if transform is None or callable(transform):
        return transform
    spec = transform if isinstance(transform, TransformSpec) else TransformSpec.from_dict(transform)
    return lambda frames: resize_crop(spec, frames)


def is_tensor(frames) -> bool:
    return type(frames).__module__.startswith("torch")   # without importing torch


def _checked(frames, count: int):
    """uint8 [count, H, W, 3] frames, contiguous numpy or, from NVDEC, a CUDA tensor checked as it is."""
    if is_tensor(frames):
        if str(frames.dtype) != "torch.uint8":
            raise DecodeError("decode", f"decoder returned a {frames.dtype} tensor")
    else:
        frames = np.ascontiguousarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) != count:
        raise DecodeError("decode", f"decoder returned an array of shape {tuple(frames.shape)}")
    return frames


def _batch(video, index: np.ndarray, start: int, step: int, n: int):
    want = index[start:start + step]
    try:
        return _checked(video.get_batch(want), len(want))
    except DecodeError:
        raise
    except Exception as err:
        raise DecodeError("decode", f"frames {want[0]}..{want[-1]} of {n}: {error_message(err)}") from err


def _open(opener, path: str, policy: SamplingPolicy, threads: int):
    """Open, sample and decode the first chunk: a backend that refuses the file does so here."""
    try:
        video = opener(path, threads)
        timing = video_timing(video.num_frames, float(video.fps), getattr(video, "pts", None))
        keys = getattr(video, "key_indices", None) if policy.keyframes_only else None
        index, stamps = sample_timing(timing, policy, keys)
        if hasattr(video, "will_need"):
            video.will_need(index)     # PyAV: decode only these frames and those they are predicted from
    except SamplingError as err:
        raise DecodeError("open", f"cannot sample frames: {err}") from err
    except Exception as err:
        raise DecodeError("open", error_message(err), isinstance(err, BrokenFile)) from err
    return video, timing, index, stamps, _batch(video, index, 0, CHUNK_FRAMES, timing.num_frames)


def _name(opener) -> str:
    return getattr(opener, "backend", None) or getattr(opener, "__name__", str(opener))


def decode_video(opener, path: str, policy: SamplingPolicy, threads: int = 1, transform=None, fallback=None):
    """Generator used by the worker (and usable in-process): yields the messages listed above, minus job.

    transform: a TransformSpec (or its dict): frames are sent as open_clip's eval resize + crop of them.
    fallback: an opener tried when `opener` refuses the file (any error before the first frame but a
    BrokenFile: a file cut short, which the fallback could read as a shorter video).
    """
    crop = crop_of(transform)
    try:
        video, timing, index, stamps, frames = _open(opener, path, policy, threads)
    except DecodeError as err:
        if err.broken:
            raise DecodeError(err.stage, f"{_name(opener)}: {err}", True) from err
        if fallback is None:
            raise
        try:
            video, timing, index, stamps, frames = _open(fallback, path, policy, threads)
        except DecodeError as err2:
            raise DecodeError(err2.stage, f"{_name(opener)}: {err}; {_name(fallback)} (fallback): "
                                          f"{err2}") from err2
    n = timing.num_frames
    yield ("meta", n, timing.fps, timing.duration, index, stamps, getattr(video, "backend", _name(opener)))
    start = 0
    while True:
        step = chunk_frames(frames.shape[1], frames.shape[2])
        if crop is not None:
            try:
                frames = crop(frames)
            except Exception as err:
                raise DecodeError("decode", f"resize/crop of frames {index[start]}.. of shape "
                                            f"{tuple(frames.shape)}: {error_message(err)}") from err
        yield ("frames", start, frames)
        start += len(frames)
        if start >= len(index):
            break
        frames = _batch(video, index, start, step, n)
    yield ("done",)


def decode_worker(inbox, outbox, policy_dict: dict, decoder: str | None, threads: int,
            transform: dict | None = None, fallback: str | None = None) -> None:
    # Ctrl-C is the main process's: it ends the workers. Blocked by the parent while we started.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:  # FFmpeg's own messages about broken files: the error goes to failures.jsonl instead
        import decord
        decord.logging.set_level(decord.logging.QUIET)
    except Exception:  # noqa: BLE001 - logging only
        pass
    opener = resolve_decoder(decoder)
    backup = resolve_decoder(fallback) if fallback else None
    policy = SamplingPolicy.from_dict(policy_dict)
    while True:
        try:
            task = inbox.recv()
        except EOFError:
            return
        if task is None:
            return
        job, path = task
        try:
            for msg in decode_video(opener, path, policy, threads, transform, backup):
                outbox.send((msg[0], job, *msg[1:]))
        except DecodeError as err:
            outbox.send(("error", job, err.stage, str(err)))
        except Exception as err:  # a bug, not a bad video: still one video, keep the run going
            outbox.send(("error", job, "decode", error_message(err) + " | " + traceback.format_exc(limit=3)))
