"""Decode sampled frames in worker processes, with a timeout that kills a worker stuck in native code.

Each worker is a `spawn`ed process (no fork of a process that holds torch threads) that takes one video at
a time over its own pipe and answers on its own pipe:

    ("meta", job, num_source_frames, fps, duration, frame_index, timestamps)   after opening
    ("frames", job, start, uint8 [k, H, W, 3])                                  one chunk of sampled frames
    ("done", job)  |  ("error", job, stage, message)                            stage: open | decode

Frames travel in chunks (32 frames, fewer for very large frames, see `chunk_frames`), so memory stays
bounded whatever the length of the video: a worker decodes one chunk ahead and then blocks on its pipe
until the main process takes it. One pipe per worker, never a shared queue: a worker killed while it
writes would leave a shared queue's lock held and hang every other worker.

Frames are sent at full resolution. decord can resize while decoding, but its scaler (swscale) does not
give the pixels that open_clip's PIL bicubic resize gives, and parity with open_clip matters more than the
saved bandwidth; the resize happens on the device in the encoder's preprocess.

Timeout: a worker that shows no progress (no message) for `timeout` seconds of the main process's waiting
time is killed with SIGKILL and replaced; its video is recorded as failed at the stage it was in. Time the
main process spends encoding does not count (the worker may be blocked on its pipe then), and a long video
that keeps sending chunks never times out: the timeout catches hangs, not long videos.

Test seam: `decoder` (or env `CMDCL_DECODER`) names the function that opens a video: "decord" (default),
"hang-test" (decord, except that files whose name contains "hang" never return, as decord can on broken
files), or "module:function" returning an object with `num_frames`, `fps`, `get_batch(indices)`.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait

import numpy as np

from .sampling import SamplingError, SamplingPolicy, sample_frames

CHUNK_FRAMES = 32
CHUNK_BYTES = 64 << 20   # at most this many bytes of frames per message


class DecodeError(RuntimeError):
    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


def chunk_frames(height: int, width: int, limit: int = CHUNK_FRAMES) -> int:
    return max(1, min(limit, CHUNK_BYTES // max(1, height * width * 3)))


# ------------------------------------------------------------------------------------------- decoders

class DecordVideo:
    def __init__(self, path: str, threads: int = 1):
        import decord
        self._vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
        self.num_frames = len(self._vr)
        self.fps = float(self._vr.get_avg_fps())

    def get_batch(self, indices) -> np.ndarray:
        return self._vr.get_batch([int(i) for i in indices]).asnumpy()


def _open_hang_test(path: str, threads: int = 1):
    if "hang" in os.path.basename(path):
        while True:          # what a decoder stuck in native code looks like from outside
            time.sleep(3600)
    return DecordVideo(path, threads)


def resolve_decoder(name: str | None):
    name = name or os.environ.get("CMDCL_DECODER") or "decord"
    if name == "decord":
        return DecordVideo
    if name == "hang-test":
        return _open_hang_test
    module, _, attr = name.partition(":")
    if not attr:
        raise ValueError(f"unknown decoder {name!r}: use decord, hang-test or module:function")
    return getattr(importlib.import_module(module), attr)


def _message(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:500]}"


def decode_video(opener, path: str, policy: SamplingPolicy, threads: int = 1):
    """Generator used by the worker (and usable in-process): yields the messages listed above, minus job."""
    try:
        video = opener(path, threads)
        n, fps = int(video.num_frames), float(video.fps)
        index, stamps = sample_frames(n, fps, policy)
    except SamplingError as err:
        raise DecodeError("open", f"cannot sample frames: {err}") from err
    except Exception as err:
        raise DecodeError("open", _message(err)) from err
    yield ("meta", n, fps, n / fps, index, stamps)
    start, step = 0, CHUNK_FRAMES
    while start < len(index):
        try:
            frames = np.ascontiguousarray(video.get_batch(index[start:start + step]), dtype=np.uint8)
        except Exception as err:
            raise DecodeError("decode", f"frames {index[start]}..{index[min(start + step, len(index)) - 1]}"
                                        f" of {n}: {_message(err)}") from err
        if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) != len(index[start:start + step]):
            raise DecodeError("decode", f"decoder returned an array of shape {frames.shape}")
        yield ("frames", start, frames)
        start += len(frames)
        step = chunk_frames(frames.shape[1], frames.shape[2])
    yield ("done",)


def _worker(inbox, outbox, policy_dict: dict, decoder: str | None, threads: int) -> None:
    try:  # FFmpeg's own messages about broken files: the error goes to failures.jsonl instead
        import decord
        decord.logging.set_level(decord.logging.QUIET)
    except Exception:  # noqa: BLE001 - logging only
        pass
    opener = resolve_decoder(decoder)
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
            for msg in decode_video(opener, path, policy, threads):
                outbox.send((msg[0], job, *msg[1:]))
        except DecodeError as err:
            outbox.send(("error", job, err.stage, str(err)))
        except Exception as err:  # a bug, not a bad video: still one video, keep the run going
            outbox.send(("error", job, "decode", _message(err) + " | " + traceback.format_exc(limit=3)))


# ----------------------------------------------------------------------------------------------- pool

@dataclass
class _Slot:
    process: mp.Process
    inbox: object          # main -> worker
    outbox: object         # worker -> main
    job: object = None
    stage: str = "open"
    waited: float = 0.0    # seconds the main process has waited on this job since its last message


class DecodePool:
    """A fixed number of decode workers; `submit` a video to an idle one, `poll` for messages."""

    def __init__(self, workers: int, policy: SamplingPolicy, timeout: float = 120.0,
                 decoder: str | None = None, threads: int | None = None):
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        self.policy, self.timeout, self.decoder = policy, float(timeout), decoder
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)
        self._ctx = mp.get_context("spawn")
        self.slots = [self._start() for _ in range(workers)]
        self.restarts = 0

    def _start(self) -> _Slot:
        inbox_r, inbox_w = self._ctx.Pipe(duplex=False)
        outbox_r, outbox_w = self._ctx.Pipe(duplex=False)
        p = self._ctx.Process(target=_worker, args=(inbox_r, outbox_w, self.policy.to_dict(), self.decoder,
                                                    self.threads), daemon=True, name="cmdcl-decode")
        p.start()
        inbox_r.close()
        outbox_w.close()
        return _Slot(p, inbox_w, outbox_r)

    @property
    def idle(self) -> int:
        return sum(s.job is None for s in self.slots)

    @property
    def busy(self) -> int:
        return len(self.slots) - self.idle

    def submit(self, job, path: str) -> None:
        slot = next(s for s in self.slots if s.job is None)
        slot.job, slot.stage, slot.waited = job, "open", 0.0
        slot.inbox.send((job, str(path)))

    def _replace(self, slot: _Slot) -> None:
        slot.process.kill()
        slot.process.join(5)
        for conn in (slot.inbox, slot.outbox):
            conn.close()
        self.slots[self.slots.index(slot)] = self._start()
        self.restarts += 1

    def poll(self, timeout: float | None = 0.0) -> list[tuple]:
        """Messages ready now (waiting up to `timeout` s for the first); kills and reports hung workers.

        Returns tuples as sent by the workers; a killed worker yields ("error", job, stage, message).
        """
        busy = [s for s in self.slots if s.job is not None]
        if not busy:
            return []
        t0 = time.monotonic()
        ready = wait([s.outbox for s in busy], timeout)
        waited = time.monotonic() - t0
        out = []
        for slot in busy:
            if slot.outbox in ready:
                try:
                    msg = slot.outbox.recv()
                except (EOFError, OSError):
                    msg = ("error", slot.job, slot.stage,
                           f"decode worker died (exit code {slot.process.exitcode})")
                    job = slot.job
                    self._replace(slot)
                    out.append(msg[:1] + (job,) + msg[2:])
                    continue
                slot.waited = 0.0
                if msg[0] == "meta":
                    slot.stage = "decode"
                if msg[0] in ("done", "error"):
                    slot.job = None
                out.append(msg)
            else:
                slot.waited += waited
                if slot.waited > self.timeout:
                    job, stage = slot.job, slot.stage
                    self._replace(slot)
                    out.append(("error", job, stage, f"no progress for {self.timeout:g} s (decode timeout);"
                                                     " worker killed"))
        return out

    def cancel(self, job) -> None:
        """Stop working on `job` (e.g. it failed to encode): its worker is replaced."""
        for slot in self.slots:
            if slot.job == job:
                self._replace(slot)

    def close(self) -> None:
        for slot in self.slots:
            if slot.job is None and slot.process.is_alive():
                try:
                    slot.inbox.send(None)
                except OSError:
                    pass
        for slot in self.slots:
            slot.process.join(2 if slot.job is None else 0)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join(5)
            for conn in (slot.inbox, slot.outbox):
                conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
