"""`extract`: videos of a manifest -> sampled frames -> CLIP features -> one HDF5 shard per rank.

    manifest ─ select rank's videos ─ skip committed ─▶ DecodePool (worker processes: decord, then
        open_clip's resize + centre crop with PIL) ─ uint8 crops [k, S, S, 3] ─▶ fixed-size batches across
        videos ─▶ /255, mean/std and encode on the device ─▶ per-video features ─▶ ShardWriter journal
        (commit per video) ─▶ finalize (atomic HDF5)

Decode overlaps encode: each worker decodes (and crops) one chunk ahead and waits on its pipe while the
main process encodes. The workers crop because the main process was the bottleneck when it received
full-resolution frames (see decode.py); the crops are the very pixels `FrameEncoder.preprocess` gives.
Frames of several videos share a batch, so short videos do not leave the device idle, and every batch is
padded to exactly --batch-size rows, so a frame's feature does not depend on which other frames
happened to share its batch (kernels may pick another algorithm for another batch size): an interrupted
and resumed run writes the same bytes as one that never stopped.

Resume is the default: committed videos (in the finalized shard or in its journal) are skipped. A video
that fails goes to `failures.jsonl` with its stage (open, decode, encode, write) and the run goes on;
`--retry-failed` runs only those. Exit status: 0 every selected video is in the cache, 1 some failed but
the cache holds the others, 2 nothing could be extracted or a fatal error (bad manifest, bad options,
a cache made with other settings).

Random weights (`--pretrained none`, tests and demos) are seeded (torch seed 0, recorded as `init_seed`),
so that two runs, and a run and its resumption, build the same network.
"""

from __future__ import annotations

import collections
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .failures import RUN_LOG, append_line, read_failures, record_failure
from .ranks import RankInfo, detect_rank, split_ids
from .sampling import SamplingPolicy

EXIT_OK, EXIT_PARTIAL, EXIT_FATAL = 0, 1, 2
INIT_SEED = 0


class ExtractError(RuntimeError):
    """A fatal problem: nothing can be extracted with these options."""


@dataclass
class ExtractOptions:
    dataset: str
    video_root: Path
    cache: Path
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    precision: str = "fp16"
    device: str = "auto"
    policy: SamplingPolicy = field(default_factory=SamplingPolicy)
    batch_size: int = 64
    workers: int = 4
    decode_timeout: float = 120.0
    split: str | None = None
    shard_index: int | None = None
    num_shards: int | None = None
    retry_failed: bool = False
    tokens: str = "cls"
    grid: int = 4
    prompts: Path | None = None
    quiet: bool = False
    decoder: str | None = None       # --decoder: a backend of decoders/ (None: decord) or a test seam
    fallback_decoder: str | None = "pyav"   # --fallback-decoder: tried when `decoder` refuses a file
    decode_threads: int | None = None


@dataclass
class ExtractResult:
    cache_dir: Path
    exit_code: int
    selected: int = 0          # videos of this rank (and split) in the manifest
    todo: int = 0              # of which this run tried
    committed: int = 0         # committed by this run
    failed: list = field(default_factory=list)   # ids that failed in this run
    missing: list = field(default_factory=list)  # selected ids not in the cache at the end
    frames: int = 0
    seconds: float = 0.0
    shard: Path | None = None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "x"


def model_tag(model: str, pretrained: str | None, tokens: str = "cls", grid: int = 4) -> str:
    """Folder name of a cache: model + weights (+ grid), safe for paths. A checkpoint file gives its stem."""
    p = "none" if pretrained is None or str(pretrained).lower() == "none" else str(pretrained)
    if "/" in p or "\\" in p or Path(p).suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt"):
        p = Path(p).stem
    tag = f"{_safe(model)}-{_safe(p)}"
    return tag + (f"-grid{int(grid)}" if tokens == "grid" else "")


def cache_folder(cache: Path, dataset: str, model: str, pretrained: str | None, tokens: str = "cls",
                 grid: int = 4) -> Path:
    return Path(cache) / _safe(dataset) / model_tag(model, pretrained, tokens, grid)


def load_encoder_seeded(spec):
    """load_encoder, with torch's global seed fixed for random weights (restored afterwards)."""
    import torch

    from .encoder import load_encoder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return load_encoder(spec)


def shard_provenance(encoder, dataset: str, policy: SamplingPolicy, rank: RankInfo,
                     decoder: str | None = None, fallback: str | None = "pyav") -> dict:
    from .decode import decoder_provenance
    prov = {**encoder.provenance(), "dataset": dataset, "sampling": policy.to_dict(),
            "decoder": decoder_provenance(decoder, fallback), "shard_index": rank.rank,
            "shard_count": rank.world}
    if prov.get("pretrained") == "none":
        prov["init_seed"] = INIT_SEED
    return _plain(prov)


def _plain(prov: dict) -> dict:
    # JSON round trip: plain str/int/float/list values (torch.__version__ is a str subclass h5py refuses).
    return json.loads(json.dumps(prov))


# -------------------------------------------------------------------------------------------- texts

def texts_provenance_for(encoder, dataset: str, templates: list[str]) -> dict:
    prov = {**encoder.provenance(), "dataset": dataset, "templates": list(templates)}
    if prov.get("pretrained") == "none":
        prov["init_seed"] = INIT_SEED
    return _plain(prov)


def _templates(texts_mod, prompts: Path | None) -> list[str]:
    return list(texts_mod.load_templates(prompts)) if prompts else list(texts_mod.DEFAULT_TEMPLATES)


def ensure_texts(cache_dir: Path, manifest, encoder, prompts: Path | None = None,
                 force: bool = False) -> tuple[Path, bool]:
    """Write texts.h5 unless it exists with the same provenance; returns (path, written)."""
    from . import texts as texts_mod
    from .store import _normalised, provenance_difference, texts_provenance, write_texts

    templates = _templates(texts_mod, prompts)
    prov = texts_provenance_for(encoder, manifest.dataset, templates)
    path = Path(cache_dir) / "texts.h5"
    if path.exists() and not force:
        found = texts_provenance(path)
        if provenance_difference(_normalised(prov), found, ignore={"schema_version"}) is None:
            return path, False
    sets = {name: list(ls.names) for name, ls in manifest.label_sets.items()}
    embeddings = texts_mod.build_text_embeddings(encoder, sets, templates)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    write_texts(path, embeddings, prov)
    return path, True


# --------------------------------------------------------------------------------------- the run

@dataclass
class _Job:
    video_id: str
    path: str
    t0: float
    total: int | None = None     # frames to encode, known after "meta"
    meta: tuple | None = None    # (num_source_frames, fps, duration, frame_index, timestamps)
    decoded: bool = False
    feats: list = field(default_factory=list)
    toks: list = field(default_factory=list)
    encoded: int = 0


class _Progress:
    """rich progress bar, or (quiet) one log line every 30 s, on stderr."""

    def __init__(self, total: int, quiet: bool, label: str):
        from rich.console import Console
        self.console = Console(stderr=True, highlight=False)
        self.quiet, self.total, self.label = quiet, total, label
        self.done = self.failed = self.frames = 0
        self.t0 = self._last = time.monotonic()
        self._bar = None
        if not quiet:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]:.1f} frames/s"),
                                 TextColumn("{task.fields[failed]} failed"),
                                 TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                                 console=self.console, transient=False)
            self._task = self._bar.add_task(label, total=total, rate=0.0, failed=0)
            self._bar.start()

    def log(self, text: str) -> None:
        self.console.print(text, markup=False)

    def update(self, done=0, failed=0, frames=0) -> None:
        self.done += done
        self.failed += failed
        self.frames += frames
        now = time.monotonic()
        rate = self.frames / max(now - self.t0, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done + self.failed, rate=rate, failed=self.failed)
        elif now - self._last > 30 or (done or failed) and self.done + self.failed == self.total:
            self._last = now
            left = (self.total - self.done - self.failed) * (now - self.t0) / max(self.done + self.failed, 1)
            self.log(f"{self.label}: {self.done + self.failed}/{self.total} videos, {rate:.1f} frames/s, "
                     f"{self.failed} failed, ~{left:.0f} s left")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _select(opts: ExtractOptions, manifest, rank: RankInfo, cache_dir: Path, committed: set[str]):
    mine = set(split_ids([v.video_id for v in manifest.videos], rank.rank, rank.world))
    selected = [v for v in manifest.select(opts.split) if v.video_id in mine]
    todo = [v for v in selected if v.video_id not in committed]
    if opts.retry_failed:
        failed = read_failures(cache_dir)
        todo = [v for v in todo if v.video_id in failed]
    return sorted(selected, key=lambda v: v.video_id), sorted(todo, key=lambda v: v.video_id)


def extract(opts: ExtractOptions) -> ExtractResult:
    """Run one rank's extraction; see the module docstring. Raises ExtractError (and the manifest's,
    encoder's and store's own errors) for fatal problems."""
    from .decode import check_decoders, start_pool
    check_decoders(opts.decoder, opts.fallback_decoder)   # before any work: BackendMissing says what to install

    import torch

    from .encoder import EncoderSpec
    from .manifest import load_manifest
    from .paths import VideoPathError, build_video_index
    from .store import CacheError, ShardWriter, shard_name

    started = datetime.now(timezone.utc)
    t_start = time.monotonic()
    if opts.batch_size < 1:
        raise ExtractError(f"--batch-size must be >= 1, got {opts.batch_size}")
    manifest = load_manifest(opts.dataset)
    rank = detect_rank(opts.shard_index, opts.num_shards)
    video_root = Path(opts.video_root).resolve()
    if not video_root.is_dir():
        raise ExtractError(f"--video-root {video_root} is not a folder")
    cache_dir = cache_folder(Path(opts.cache).resolve(), manifest.dataset, opts.model, opts.pretrained, opts.tokens, opts.grid)
    cache_dir.mkdir(parents=True, exist_ok=True)

    spec = EncoderSpec(model=opts.model, pretrained=opts.pretrained, precision=opts.precision,
                       device=rank.device(opts.device), tokens=opts.tokens, grid=opts.grid)
    encoder = load_encoder_seeded(spec)
    if rank.rank == 0:
        ensure_texts(cache_dir, manifest, encoder, opts.prompts)

    shard = cache_dir / shard_name(rank.rank, rank.world)
    prov = shard_provenance(encoder, manifest.dataset, opts.policy, rank, opts.decoder, opts.fallback_decoder)
    writer = ShardWriter(shard, prov, encoder.feature_dim, grid=opts.grid if opts.tokens == "grid" else None)
    selected, todo = _select(opts, manifest, rank, cache_dir, writer.committed_ids)
    result = ExtractResult(cache_dir, EXIT_OK, selected=len(selected), todo=len(todo), shard=shard)
    progress = _Progress(len(todo), opts.quiet, f"rank {rank.rank}/{rank.world}" if rank.world > 1 else "extract")

    def fail(job_or_id, path, stage, error, t0):
        vid = job_or_id.video_id if isinstance(job_or_id, _Job) else job_or_id
        record_failure(cache_dir, vid, path, stage, error, time.monotonic() - t0, rank.rank)
        result.failed.append(vid)
        progress.update(failed=1)
        progress.log(f"failed [{stage}] {vid}: {error}")

    # Paths first: a missing file is an "open" failure found without starting a worker.
    queue: collections.deque[_Job] = collections.deque()
    if todo:
        index = build_video_index(video_root)
        for rec in todo:
            try:
                queue.append(_Job(rec.video_id, str(index.resolve(rec)), 0.0))
            except VideoPathError as err:
                fail(rec.video_id, rec.path, "open", str(err), time.monotonic())

    jobs: dict[str, _Job] = {}
    pending: collections.deque = collections.deque()   # (job, uint8 crops [k, S, S, 3]) waiting to be encoded
    buffered = 0
    bs = opts.batch_size

    def drop(job: _Job) -> None:
        nonlocal buffered
        jobs.pop(job.video_id, None)
        keep = [(j, x) for j, x in pending if j is not job]
        buffered = sum(len(x) for _, x in keep)
        pending.clear()
        pending.extend(keep)

    def maybe_commit(job: _Job) -> None:
        nonlocal writer
        if not (job.decoded and job.meta is not None and job.encoded == job.total):
            return
        jobs.pop(job.video_id, None)
        n, fps, duration, index_, stamps = job.meta
        try:
            feats = np.concatenate(job.feats)
            toks = np.concatenate(job.toks) if job.toks else None
            writer.append_video(job.video_id, feats, index_, stamps, fps, n, duration, tokens=toks)
        except (CacheError, OSError, ValueError) as err:
            fail(job, job.path, "write", f"{type(err).__name__}: {err}", job.t0)
            # A half-written video leaves rows past the last commit: reopening cuts them off.
            writer.close()
            writer = ShardWriter(shard, prov, encoder.feature_dim,
                                 grid=opts.grid if opts.tokens == "grid" else None)
            return
        result.committed += 1
        result.frames += len(feats)
        progress.update(done=1, frames=0)

    def encode_batch() -> None:
        nonlocal buffered
        parts, take = [], bs
        while pending and take > 0:
            job, x = pending.popleft()
            if len(x) > take:
                pending.appendleft((job, x[take:]))
                x = x[:take]
            parts.append((job, x))
            take -= len(x)
        buffered -= bs - take
        try:
            crops = parts[0][1] if len(parts) == 1 else np.concatenate([x for _, x in parts])
            pixels = encoder.normalise_crops(crops)
            k = len(pixels)
            if k < bs:   # fixed batch shape: see the module docstring
                pixels = torch.cat([pixels, pixels.new_zeros((bs - k, *pixels.shape[1:]))])
            feats, toks = encoder.encode_pixels(pixels)
            feats = feats[:k].numpy()
            toks = toks[:k].numpy() if toks is not None else None
            if not np.isfinite(feats).all():
                raise FloatingPointError("the encoder returned NaN or Inf")
        except Exception as err:  # noqa: BLE001 - one batch's videos fail, the run goes on
            for job in {id(j): j for j, _ in parts}.values():
                if job.video_id in jobs:
                    pool.cancel(job.video_id)
                    fail(job, job.path, "encode", f"{type(err).__name__}: {err}", job.t0)
                    drop(job)
            return
        lo = 0
        for job, x in parts:
            job.feats.append(feats[lo:lo + len(x)])
            if toks is not None:
                job.toks.append(toks[lo:lo + len(x)])
            job.encoded += len(x)
            lo += len(x)
        progress.update(frames=k)
        for job in {id(j): j for j, _ in parts}.values():
            maybe_commit(job)

    def handle(msg) -> None:
        nonlocal buffered
        kind, vid = msg[0], msg[1]
        job = jobs.get(vid)
        if job is None:
            return  # a video already dropped
        if kind == "meta":
            n, fps, duration, index_, stamps = msg[2:7]   # msg[7]: the backend that decoded it
            job.meta, job.total = (n, fps, duration, index_, stamps), len(index_)
        elif kind == "frames":
            x = msg[3]
            if x.dtype != np.uint8 or x.shape[1:] != (*encoder.transform_spec.size, 3):
                pool.cancel(vid)   # a bug, not a bad video; still only this video fails
                fail(job, job.path, "decode", f"the decode worker sent {x.dtype} frames of shape {x.shape},"
                                              f" not the model's input size", job.t0)
                drop(job)
                return
            pending.append((job, x))
            buffered += len(x)
        elif kind == "done":
            job.decoded = True
            maybe_commit(job)
        elif kind == "error":
            fail(job, job.path, msg[2], msg[3], job.t0)
            drop(job)

    exit_code = EXIT_OK
    restarts = 0
    try:
        if queue:
            with start_pool(min(opts.workers, len(queue)), opts.policy, opts.decode_timeout, opts.decoder,
                            opts.decode_threads, encoder, opts.fallback_decoder) as pool:
                while queue or jobs:
                    while queue and pool.idle:
                        job = queue.popleft()
                        job.t0 = time.monotonic()
                        jobs[job.video_id] = job
                        pool.submit(job.video_id, job.path)
                    if buffered >= bs or (buffered and not pool.busy):
                        encode_batch()
                        continue
                    if not pool.busy:  # cannot happen unless a decoder under-delivers: never spin
                        for job in list(jobs.values()):
                            fail(job, job.path, "decode", "the decoder ended without all sampled frames",
                                 job.t0)
                            drop(job)
                        continue
                    # Wait for the workers; only briefly when some frames are waiting to be encoded.
                    for msg in pool.poll(0.05 if buffered else 0.5):
                        handle(msg)
                restarts = pool.restarts
        writer.finalize()
    except BaseException:
        writer.close()
        raise
    finally:
        progress.close()

    committed = writer.committed_ids
    result.missing = [v.video_id for v in selected if v.video_id not in committed]
    if result.missing:
        have = any(v.video_id in committed for v in selected)
        exit_code = EXIT_PARTIAL if have else EXIT_FATAL
    result.exit_code = exit_code
    result.seconds = time.monotonic() - t_start
    append_line(cache_dir / RUN_LOG, {
        "start": started.isoformat(timespec="seconds"),
        "end": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rank": rank.rank, "world": rank.world, "rank_source": rank.source,
        "args": _args_of(opts), "selected": result.selected, "todo": result.todo,
        "committed": result.committed, "failed": len(result.failed), "missing": len(result.missing),
        "frames": result.frames, "seconds": round(result.seconds, 3),
        "frames_per_s": round(result.frames / max(result.seconds, 1e-9), 2), "exit_code": exit_code,
        "decode_restarts": restarts,
    })
    return result


def _args_of(opts: ExtractOptions) -> dict:
    d = asdict(opts)
    d["policy"] = opts.policy.to_dict()
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def main_exit_message(result: ExtractResult) -> str:
    return (f"{result.committed} videos extracted ({result.frames} frames, "
            f"{result.frames / max(result.seconds, 1e-9):.1f} frames/s), {len(result.failed)} failed, "
            f"{len(result.missing)} of {result.selected} not in the cache; cache: {result.cache_dir}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `cmdcl-cache extract`")
