"""The decode / encode / commit loop of one extract run, and `encode_files` (features of
video files that are in no manifest, for `cmdcl-heads predict --video`).
"""

from __future__ import annotations

import collections
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cmdcl_cache.cache.provenance import CacheSpec, normalised, provenance_difference
from cmdcl_cache.cache.runlog import ExtractResult, record_failure
from cmdcl_cache.errors import CacheError, ProvenanceError, StorageError

if TYPE_CHECKING:   # annotations only: pipeline.py imports this module
    from cmdcl_cache.extract.pipeline import ExtractPlan

ENCODER_KEYS = ("model", "pretrained", "image_size", "mean", "std", "resize_mode", "interpolation", "tokens",
                "grid", "quick_gelu")


@dataclass
class FileFeatures:
    path: Path
    features: np.ndarray             # float16 [T, D], as a cache stores them
    tokens: np.ndarray | None        # float16 [T, P, D] with grid tokens
    timestamps: np.ndarray           # seconds of each row


def encode_files(provenance: dict, paths, device: str = "auto", pretrained: str | None = None,
                 batch_size: int = 64):
    """Features of video files that are in no manifest, computed exactly as the cache with `provenance` was:
    the same model, weights, preprocessing, tokens and sampling, padded fixed-size batches; decoded in this
    process. Yields (path, FileFeatures) or (path, the exception that stopped that file), in order."""
    from cmdcl_cache.extract.decode import check_decoders, decode_video, decoders_of_provenance, resolve_decoder
    from cmdcl_cache.extract.encoder import EncoderSpec, load_encoder

    spec = CacheSpec.from_provenance(provenance, pretrained)
    encoder = load_encoder(EncoderSpec.of(spec, device))
    here = {k: v for k, v in _plain_provenance(encoder.provenance()).items() if k in ENCODER_KEYS}
    recorded = {k: provenance.get(k) for k in ENCODER_KEYS if k in provenance}
    diff = provenance_difference(recorded, {k: v for k, v in here.items() if k in recorded}, ignore=("pretrained",))
    if diff:
        raise ProvenanceError(f"this machine's encoder differs from the one the cache was made with: {diff}")
    decoder, fallback_name = decoders_of_provenance(provenance.get("decoder", ""))   # as the cache was decoded
    check_decoders(decoder, fallback_name)
    opener = resolve_decoder(decoder)
    fallback = None if fallback_name == "none" else resolve_decoder(fallback_name)
    for path in map(Path, paths):
        try:
            feats, toks, stamps = [], [], None
            for msg in decode_video(opener, str(path), spec.sampling, transform=encoder.transform_spec,
                                    fallback=fallback):
                if msg[0] == "meta":
                    stamps = np.asarray(msg[5], dtype=np.float64)
                elif msg[0] == "frames":
                    for lo in range(0, len(msg[2]), batch_size):
                        crops = msg[2][lo:lo + batch_size]
                        k = len(crops)
                        f, t = encoder.encode_batch(crops, batch_size).result()
                        feats.append(f[:k].numpy().astype(np.float16))
                        toks.append(t[:k].numpy().astype(np.float16) if t is not None else None)
            yield path, FileFeatures(path, np.concatenate(feats),
                                     np.concatenate(toks) if toks[0] is not None else None, stamps)
        except Exception as err:   # noqa: BLE001 - one bad file is reported, the others go on
            yield path, err


def _plain_provenance(prov: dict) -> dict:
    return normalised(json.loads(json.dumps(prov)))


@dataclass
class _Job:
    video_id: str
    path: str
    t0: float = 0.0
    source: tuple = (-1, -1)     # (size, mtime_ns) of the file when it was opened
    total: int | None = None     # frames to encode, known after "meta"
    meta: tuple | None = None    # (num_source_frames, fps, duration, frame_index, timestamps)
    backend: str = ""            # the decoder backend that decoded it (the fallback, when the first refused)
    decoded: bool = False
    feats: list = field(default_factory=list)
    toks: list = field(default_factory=list)
    encoded: int = 0


MAX_IN_FLIGHT = 2   # encoder batches the device may hold while the main process receives frames


class _Committer:
    """Appends finished videos to the journal in a thread of its own, in the order they finished, so that
    encoding never waits on a write or an fsync. A write error (disk full) is kept and raised in the main
    thread at its next `check`; a video the writer refuses (its rows do not fit) is recorded as failed."""

    def __init__(self, run: "ExtractRun"):
        import queue
        import threading
        self.run, self.error = run, None
        self.queue = queue.Queue(maxsize=8)   # bounded: at most 8 finished videos held in memory
        self.thread = threading.Thread(target=self._loop, name="cmdcl-commit", daemon=True)
        self.thread.start()

    def put(self, job: "_Job", feats, toks) -> None:
        self.check()
        self.queue.put((job, feats, toks))

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.check()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.run.commit(*item)
                except BaseException as err:   # noqa: BLE001 - handed to the main thread
                    self.error = err


class ExtractRun:
    """One rank's extraction in flight: decoded crops wait in `pending` until a full batch is launched on the
    encoder; up to MAX_IN_FLIGHT batches compute while frames keep arriving; a video goes to the committer
    once all its frames are encoded and its worker said "done"."""

    def __init__(self, plan: ExtractPlan, encoder, writer, result: ExtractResult, replace: set[str]):
        from cmdcl_cache.progress import ExtractProgress
        self.plan, self.encoder, self.writer, self.result, self.replace = plan, encoder, writer, result, replace
        self.bs = plan.config.batch_size
        self.queue: collections.deque[_Job] = collections.deque()
        self.jobs: dict[str, _Job] = {}
        self.pending: collections.deque = collections.deque()   # (job, uint8 crops [k, S, S, 3])
        self.in_flight: collections.deque = collections.deque()  # (parts, k, PendingFeatures)
        self.buffered = 0
        self.restarts = 0
        self.pool = None
        label = f"rank {plan.rank.rank}/{plan.rank.world}" if plan.rank.world > 1 else "extract"
        self.progress = ExtractProgress(result.todo, plan.config.quiet, label)
        for vid, why in result.dropped:
            self.progress.log(f"journal: {vid} will be extracted again ({why})")

    def start(self, todo) -> None:
        """Paths first: a missing file is an "open" failure found without starting a worker."""
        from cmdcl_cache.manifest.paths import VideoPathError, build_video_index
        if not todo:
            return
        index = build_video_index(self.plan.video_root)
        for rec in todo:
            try:
                path = index.resolve(rec)
                st = os.stat(path)
                self.queue.append(_Job(rec.video_id, str(path), source=(st.st_size, st.st_mtime_ns)))
            except (VideoPathError, OSError) as err:
                self.fail(rec.video_id, rec.path, "open", str(err), time.monotonic())

    def fail(self, video_id: str, path: str, stage: str, error: str, t0: float) -> None:
        record_failure(self.plan.folder.path, video_id, path, stage, error, time.monotonic() - t0,
                       self.plan.rank.rank)
        self.result.failed.append(video_id)
        self.progress.update(failed=1)
        self.progress.log(f"failed [{stage}] {video_id}: {error}")

    def drop(self, job: _Job, stage: str, error: str) -> None:
        self.fail(job.video_id, job.path, stage, error, job.t0)
        self.jobs.pop(job.video_id, None)
        keep = [(j, x) for j, x in self.pending if j is not job]
        self.buffered = sum(len(x) for _, x in keep)
        self.pending = collections.deque(keep)

    def loop(self, pool) -> None:
        self.pool, self.committer = pool, _Committer(self)
        try:
            while self.queue or self.jobs:
                self.committer.check()
                while self.queue and pool.idle:
                    job = self.queue.popleft()
                    job.t0 = time.monotonic()
                    self.jobs[job.video_id] = job
                    pool.submit(job.video_id, job.path)
                if self.buffered >= self.bs or (self.buffered and not pool.busy):
                    self.launch_batch()
                    continue
                if self.in_flight and (not pool.busy or self.in_flight[0][2].ready()):
                    self.harvest()
                    continue
                if not pool.busy:  # cannot happen unless a decoder under-delivers: never spin
                    for job in list(self.jobs.values()):
                        self.drop(job, "decode", "the decoder ended without all sampled frames")
                    continue
                # Wait for the workers; only briefly when frames wait to be encoded or batches to be read.
                for msg in pool.poll(0.005 if self.in_flight else 0.05 if self.buffered else 0.5):
                    self.on_message(msg)
        finally:
            self.committer.close()
        self.restarts = pool.restarts

    def on_message(self, msg) -> None:
        kind, vid = msg[0], msg[1]
        job = self.jobs.get(vid)
        if job is None:
            return  # a video already dropped
        if kind == "meta":
            n, fps, duration, index_, stamps = msg[2:7]
            job.meta, job.total = (n, fps, duration, index_, stamps), len(index_)
            job.backend = str(msg[7]) if len(msg) > 7 else ""
        elif kind == "frames":
            x = msg[3]
            if x.dtype != np.uint8 or x.shape[1:] != (*self.encoder.transform_spec.size, 3):
                self.pool.cancel(vid)   # a bug, not a bad video; still only this video fails
                self.drop(job, "decode", f"the decode worker sent {x.dtype} frames of shape {x.shape}, "
                                         "not the model's input size")
                return
            self.pending.append((job, x))
            self.buffered += len(x)
        elif kind == "done":
            job.decoded = True
            self.maybe_commit(job)
        elif kind == "error":
            self.drop(job, msg[2], msg[3])

    def _take_batch(self) -> list[tuple[_Job, np.ndarray]]:
        parts, take = [], self.bs
        while self.pending and take > 0:
            job, x = self.pending.popleft()
            if len(x) > take:
                self.pending.appendleft((job, x[take:]))
                x = x[:take]
            parts.append((job, x))
            take -= len(x)
        self.buffered -= self.bs - take
        return parts

    def _encode_failed(self, parts, err: BaseException) -> None:
        for job in {id(j): j for j, _ in parts}.values():
            if job.video_id in self.jobs:
                self.pool.cancel(job.video_id)
                self.drop(job, "encode", f"{type(err).__name__}: {err}")

    def launch_batch(self) -> None:
        parts = self._take_batch()
        try:
            crops = parts[0][1] if len(parts) == 1 else np.concatenate([x for _, x in parts])
            self.in_flight.append((parts, len(crops), self.encoder.encode_batch(crops, self.bs)))
        except Exception as err:  # noqa: BLE001 - one batch's videos fail, the run goes on
            self._encode_failed(parts, err)
        while len(self.in_flight) > MAX_IN_FLIGHT:
            self.harvest()

    def harvest(self) -> None:
        """Read the oldest batch's features (waiting for the device only if it is still computing)."""
        parts, k, pending = self.in_flight.popleft()
        try:
            feats, toks = pending.result()
            feats = feats[:k].numpy()
            toks = toks[:k].numpy() if toks is not None else None
            if not np.isfinite(feats).all():
                raise FloatingPointError("the encoder returned NaN or Inf")
        except Exception as err:  # noqa: BLE001 - one batch's videos fail, the run goes on
            self._encode_failed(parts, err)
            return
        lo = 0
        for job, x in parts:
            job.feats.append(feats[lo:lo + len(x)])
            if toks is not None:
                job.toks.append(toks[lo:lo + len(x)])
            job.encoded += len(x)
            lo += len(x)
        self.progress.update(frames=k)
        for job in {id(j): j for j, _ in parts}.values():
            self.maybe_commit(job)

    def maybe_commit(self, job: _Job) -> None:
        if not (job.decoded and job.meta is not None and job.encoded == job.total):
            return
        if job.video_id not in self.jobs:
            return   # dropped (an encode failure) while its last batch was in flight
        self.jobs.pop(job.video_id, None)
        self.committer.put(job, np.concatenate(job.feats), np.concatenate(job.toks) if job.toks else None)

    def commit(self, job: _Job, feats, toks) -> None:
        """In the committer's thread: the journal write of one video."""
        n, fps, duration, index_, stamps = job.meta
        try:
            self.writer.append_video(job.video_id, feats, index_, stamps, fps, n, duration, tokens=toks,
                                     source_size=job.source[0], source_mtime_ns=job.source[1],
                                     decoder=job.backend, replace=job.video_id in self.replace)
        except StorageError:
            raise   # disk full, I/O error: not the video's fault; the run stops (exit 2), commits are kept
        except CacheError as err:   # refused before anything was written (e.g. rows of the wrong shape)
            self.fail(job.video_id, job.path, "write", str(err), job.t0)
            return
        self.result.committed += 1
        self.result.frames += len(feats)
        self.progress.update(done=1)
