"""The decode pools: worker processes with a timeout (DecodePool), or threads of the
main process for NVDEC (GpuDecodePool). The protocol and the timeout rule are
decode.py's docstring.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from cmdcl_cache.cache.sampling import SamplingPolicy
from cmdcl_cache.extract.decode import (DecodeError, crop_of, decode_video, decode_worker, error_message, fallback_of,
                                        is_tensor, resolve_decoder, worker_decoder)
from cmdcl_cache.extract.transform import TransformSpec


@dataclass
class _Slot:
    process: mp.Process
    inbox: object          # main -> worker
    outbox: object         # worker -> main
    job: object = None
    stage: str = "open"
    waited: float = 0.0    # seconds the main process has waited on this job since its last message


class _SlotPool:
    """What both pools share: slots that hold at most one job each."""

    slots: list

    @property
    def idle(self) -> int:
        return sum(s.job is None for s in self.slots)

    @property
    def busy(self) -> int:
        return len(self.slots) - self.idle

    def _free_slot(self, job):
        slot = next(s for s in self.slots if s.job is None)
        slot.job, slot.stage, slot.waited = job, "open", 0.0
        return slot


class DecodePool(_SlotPool):
    """A fixed number of decode workers; `submit` a video to an idle one, `poll` for messages.

    transform: the encoder's TransformSpec: workers send open_clip's resize + crop of the frames (see the
    module docstring); None sends full frames. decoder / fallback: backend names (decoders/), the
    fallback tried when the first refuses a file ("none" or None: no fallback).
    """

    def __init__(self, workers: int, policy: SamplingPolicy, timeout: float = 120.0,
                 decoder: str | None = None, threads: int | None = None,
                 transform: TransformSpec | None = None, fallback: str | None = None):
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        self.policy, self.timeout, self.decoder = policy, float(timeout), worker_decoder(decoder)
        self.fallback = fallback_of(fallback, decoder)
        self.transform = transform if transform is None or isinstance(transform, TransformSpec) else \
            TransformSpec.from_dict(transform)
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)
        self._ctx = mp.get_context("spawn")
        self.slots = [self._start() for _ in range(workers)]
        self.restarts = 0

    def _start(self) -> _Slot:
        inbox_r, inbox_w = self._ctx.Pipe(duplex=False)
        outbox_r, outbox_w = self._ctx.Pipe(duplex=False)
        transform = self.transform.to_dict() if self.transform is not None else None
        p = self._ctx.Process(target=decode_worker, args=(inbox_r, outbox_w, self.policy.to_dict(), self.decoder,
                                                    self.threads, transform, self.fallback),
                              daemon=True, name="cmdcl-decode")
        # The child inherits the blocked SIGINT through exec, so a Ctrl-C during its start-up is not
        # a KeyboardInterrupt traceback from it; decode_worker ignores SIGINT and unblocks it.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        inbox_r.close()
        outbox_w.close()
        return _Slot(p, inbox_w, outbox_r)

    def submit(self, job, path: str) -> None:
        self._free_slot(job).inbox.send((job, str(path)))

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


@dataclass
class _Thread:
    job: object = None
    stage: str = "open"
    waited: float = 0.0
    inbox: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=1))  # decoder -> main, 1 ahead
    stop: threading.Event = field(default_factory=threading.Event)


class GpuDecodePool(_SlotPool):
    """DecodePool's interface over threads of the main process, for NVDEC (torchcodec-cuda).

    Each video is decoded by a daemon thread that stays one chunk ahead (a queue of one message, as a
    worker's pipe). A thread cannot be killed: on a timeout or `cancel` it is told to stop and left to
    end by itself, and a fresh slot takes the next video. `crop` turns a CUDA tensor of frames into
    uint8 crops on the host (the encoder's GPU resize); files NVDEC refuses go to the CPU fallback
    and PIL's resize, which gives the same bytes.
    """

    def __init__(self, workers: int, policy: SamplingPolicy, timeout: float, crop, transform: TransformSpec,
                 decoder: str = "torchcodec-cuda", fallback: str | None = None, device=None):
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        self.policy, self.timeout, self._device = policy, float(timeout), device
        self._opener = resolve_decoder(decoder)
        backup = fallback_of(fallback, decoder)
        self._backup = resolve_decoder(backup) if backup else None
        cpu_crop = crop_of(transform)
        self._crop = None if crop is None and cpu_crop is None else \
            (lambda frames: crop(frames) if is_tensor(frames) else cpu_crop(frames))
        self.slots = [_Thread() for _ in range(workers)]
        self.restarts = 0

    def submit(self, job, path: str) -> None:
        slot = self._free_slot(job)
        threading.Thread(target=self._run, args=(slot, job, str(path)), daemon=True,
                         name=f"cmdcl-nvdec-{job}").start()

    def _send(self, slot: _Thread, msg: tuple) -> bool:
        while not slot.stop.is_set():
            try:
                slot.inbox.put(msg, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, slot: _Thread, job, path: str) -> None:
        if self._device is not None and self._device.type == "cuda":
            import torch
            torch.cuda.set_device(self._device)   # per thread: NVDEC decodes on the encoder's GPU
        try:
            for msg in decode_video(self._opener, path, self.policy, 1, self._crop, self._backup):
                if not self._send(slot, (msg[0], job, *msg[1:])):
                    return
        except DecodeError as err:
            self._send(slot, ("error", job, err.stage, str(err)))
        except Exception as err:  # noqa: BLE001 - a bug or a CUDA error: this video fails, the run goes on
            self._send(slot, ("error", job, "decode", error_message(err) + " | " + traceback.format_exc(limit=3)))

    def _abandon(self, slot: _Thread) -> None:
        slot.stop.set()
        self.slots[self.slots.index(slot)] = _Thread()
        self.restarts += 1

    def poll(self, timeout: float | None = 0.0) -> list[tuple]:
        t0 = time.monotonic()
        while True:
            busy = [s for s in self.slots if s.job is not None]
            out = []
            for slot in busy:
                try:
                    msg = slot.inbox.get_nowait()
                except queue.Empty:
                    continue
                slot.waited = 0.0
                slot.stage = "decode" if msg[0] == "meta" else slot.stage
                if msg[0] in ("done", "error"):
                    slot.job = None
                out.append(msg)
            waited = time.monotonic() - t0
            if out or not busy or waited >= (timeout or 0.0):
                break
            time.sleep(0.002)
        for slot in busy:
            if slot.job is not None and not any(m[1] == slot.job for m in out):
                slot.waited += waited
                if slot.waited > self.timeout:
                    out.append(("error", slot.job, slot.stage, f"no progress for {self.timeout:g} s "
                                                               "(decode timeout); thread abandoned"))
                    self._abandon(slot)
        return out

    def cancel(self, job) -> None:
        for slot in self.slots:
            if slot.job == job:
                self._abandon(slot)

    def close(self) -> None:
        for slot in self.slots:
            slot.stop.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_pool(workers: int, policy: SamplingPolicy, timeout: float, decoder: str | None,
               threads: int | None, encoder, fallback: str | None = None):
    """The decode pool for `decoder`: worker processes, or GPU threads for torchcodec-cuda. `encoder`
    gives the crop: its TransformSpec for the workers, its GPU resize_crop for NVDEC."""
    if decoder == "torchcodec-cuda":
        crop = lambda frames: encoder.resize_crop(frames).cpu().numpy()  # noqa: E731
        return GpuDecodePool(workers, policy, timeout, crop, encoder.transform_spec, decoder, fallback,
                             encoder.device)
    return DecodePool(workers, policy, timeout, decoder, threads, encoder.transform_spec, fallback)
