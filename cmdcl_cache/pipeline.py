"""`extract`: videos of a manifest -> sampled frames -> CLIP features -> one HDF5 shard per rank.

    manifest ─ select rank's videos ─ skip committed ─▶ DecodePool (worker processes: PyAV, then
        open_clip's resize + centre crop with PIL) ─ uint8 crops [k, S, S, 3] ─▶ fixed-size batches across
        videos ─▶ /255, mean/std and encode on the device ─▶ per-video features ─▶ ShardWriter journal
        (commit per video, with its checksum) ─▶ finalize (atomic HDF5)

Decode overlaps encode: each worker decodes (and crops) one chunk ahead and waits on its pipe while the
main process encodes. The workers crop because the main process was the bottleneck when it received
full-resolution frames (see decode.py); the crops are the very pixels `FrameEncoder.preprocess` gives.
Frames of several videos share a batch, so short videos do not leave the device idle, and every batch is
padded to exactly --batch-size rows, so a frame's feature does not depend on which other frames
happened to share its batch (kernels may pick another algorithm for another batch size): an interrupted
and resumed run writes the same bytes as one that never stopped.

Order of work, so that a mistake costs seconds and leaves nothing behind: options, manifest, encoder name
and weights tag and ranks are checked before any folder is created; a cache that holds every selected
video already is left untouched (exit 0, even on a read-only file system); only then is the model
loaded, texts.h5 written (rank 0) and the shard's lock taken.

Resume is the default: committed videos (in the finalized shard or in its journal) are skipped. A video
that fails goes to `failures.jsonl` with its stage (open, decode, encode, write) and the run goes on;
`--retry-failed` runs only those; `--refresh-changed` extracts again the committed videos whose file's
size or modification time differs from what was recorded when they were read. A failure to write the
journal (disk full, I/O error) stops the run at once (exit 2): what is committed stays, and the same
command resumes. Exit status: 0 every selected video is in the cache, 1 some failed but the cache holds
the others, 2 nothing could be extracted or a fatal error (bad manifest, bad options, a cache made with
other settings, another extract writing the same shard, a write error).
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np

from .cache import CacheFolder, CacheSpec, check_not_nested, for_writing
from .config import check_choices, option
from .failures import append_run_log, read_failures, record_failure
from .ranks import RankInfo, detect_rank, split_ids
from .sampling import SamplingPolicy
from .store import CacheError, StorageError, read_shard
from .texts import PROMPTS_HELP

EXIT_OK, EXIT_PARTIAL, EXIT_FATAL = 0, 1, 2


class ExtractError(RuntimeError):
    """A fatal problem: nothing can be extracted with these options."""


@dataclass(frozen=True)
class ExtractConfig:
    """Everything `cmdcl-cache extract` is told; the fields are its flags (`--config FILE` takes them too)."""

    dataset: str = option(None, "Built-in manifest (coin, breakfast, charades, demo) or a manifest folder.",
                          required=True)
    video_root: str = option(None, "Folder the manifest's video paths are relative to.", required=True)
    cache: str = option(None, "Cache root (features go to <cache>/<dataset>/<model tag>/), or a cache folder "
                              "to resume.", required=True)
    model: str = option("ViT-B-16", "open_clip model name (cmdcl-tiny: a small random-weight try-out model).")
    pretrained: str = option("openai", "open_clip weight tag, a checkpoint file, or none (random, seeded).")
    precision: Literal["fp32", "fp16", "bf16"] = option("fp16", "Autocast precision on CUDA (CPU computes in fp32).")
    device: str = option("auto", "auto, cpu, cuda (cuda:LOCAL_RANK under torchrun/Slurm) or cuda:N.")
    fps: float = option(1.0, "Sampled frames per second of video (rate mode).")
    min_frames: int = option(8, "Rate mode: at least this many frames (never more than the video has).")
    max_frames: int = option(4096, "Rate mode: at most this many frames per video.")
    num_frames: int | None = option(None, "Exactly N frames per video, uniform (repeats frames of very short videos).")
    batch_size: int = option(64, "Frames per encoder batch, gathered across videos.")
    workers: int = option(4, "Decode worker processes.")
    decode_timeout: float = option(120.0, "Seconds without decode progress after which a worker is killed and "
                                          "its video failed.")
    split: str | None = option(None, "Only videos of this split (train, val, test); default all.")
    shard_index: int | None = option(None, "This process's shard (default: from torchrun/Slurm, else 0).")
    num_shards: int | None = option(None, "Number of shards (default: from torchrun/Slurm, else 1).")
    retry_failed: bool = option(False, "Only the videos listed in failures.jsonl that are not committed.")
    refresh_changed: bool = option(False, "Also extract again the committed videos whose file changed (size or "
                                          "modification time) since it was read.")
    tokens: Literal["cls", "grid"] = option("cls", "cls: one feature per frame; grid: also a pooled patch grid.")
    grid: int = option(4, "Side of the pooled patch grid with --tokens grid.")
    prompts: str | None = option(None, PROMPTS_HELP)
    quiet: bool = option(False, "Log lines instead of a progress bar (for batch jobs).")
    decoder: Literal["decord", "pyav", "torchcodec", "torchcodec-cuda"] | None = option(
        None, "Decoder backend: pyav, decord, torchcodec, torchcodec-cuda (NVDEC, frames decoded and cropped on "
              "the GPU; `pip install 'cmdcl[gpu-decode]'`). Default: the one a resumed or extended cache records "
              "(decord for caches made before PyAV became the default), pyav for a new cache (it skips the "
              "frames no sample needs: 1.3-2.3x decord's frames per CPU second here, same pixels). Tests swap "
              "the decoder with the CMDCL_DECODER environment variable, never from a configuration.")
    fallback_decoder: Literal["decord", "pyav", "none"] | None = option(
        None, "Tried on a file the decoder refuses. Default: the one a resumed cache records, else decord "
              "for pyav and pyav for the others (decord refuses video rotated by 90 or 270 degrees).")
    keyframes_only: bool = option(False, "Each sample is the keyframe nearest its bin centre: decodes one "
                                         "frame per sample, at a timing error up to half a keyframe interval.")
    decode_threads: int | None = option(None, "Threads per decode worker.", cli=False)

    def __post_init__(self):
        check_choices(self)
        for name in ("batch_size", "workers", "grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.decode_timeout > 0:
            raise ValueError(f"--decode-timeout must be > 0, got {self.decode_timeout}")
        self.policy   # checks fps / min / max / num frames

    @property
    def policy(self) -> SamplingPolicy:
        return SamplingPolicy(fps=self.fps, min_frames=self.min_frames, max_frames=self.max_frames,
                              num_frames=self.num_frames, keyframes_only=self.keyframes_only)

    @property
    def spec(self) -> CacheSpec:
        return CacheSpec(model=self.model, pretrained=self.pretrained, precision=self.precision,
                         tokens=self.tokens, grid=self.grid, sampling=self.policy)


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
    dropped: list = field(default_factory=list)  # journal commits found damaged (extracted again)


@dataclass
class ExtractPlan:
    """What a run will do, decided before anything is written."""

    config: ExtractConfig
    manifest: object
    rank: RankInfo
    folder: CacheFolder
    video_root: Path
    selected: list          # this rank's records (of the split), sorted by id
    pretrained_id: str      # the weights as the provenance records them (a tag, sha256:..., none)
    decoder: str | None     # the backends of this run: given, else the cache's own, else the defaults (None)
    fallback: str | None

    @property
    def shard(self) -> Path:
        return self.folder.shard_path(self.rank.rank, self.rank.world)


def plan_extraction(config: ExtractConfig) -> ExtractPlan:
    """Every check that needs no model and writes nothing (see the module docstring)."""
    from .decode import check_decoders, run_decoders
    from .encoder import EncoderSpec, check_encoder_spec
    from .manifest import load_manifest

    check_decoders(config.decoder, config.fallback_decoder)   # BackendMissing says what to install
    manifest = load_manifest(config.dataset)
    rank = detect_rank(config.shard_index, config.num_shards)
    video_root = Path(config.video_root).resolve()
    if not video_root.is_dir():
        raise ExtractError(f"--video-root {video_root} is not a folder")
    _, pretrained_id, _ = check_encoder_spec(EncoderSpec.of(config.spec, config.device))
    folder = for_writing(Path(config.cache).resolve(), manifest.dataset, config.spec)
    _check_shard_count(folder, rank.world)
    decoder, fallback = run_decoders(config.decoder, config.fallback_decoder, folder.provenance().get("decoder"))
    if (decoder, fallback) != (config.decoder, config.fallback_decoder):
        check_decoders(decoder, fallback)   # the backends a resumed cache records must run here too
    mine = set(split_ids([v.video_id for v in manifest.videos], rank.rank, rank.world))
    selected = sorted((v for v in manifest.select(config.split) if v.video_id in mine), key=lambda v: v.video_id)
    return ExtractPlan(config, manifest, rank, folder, video_root, selected, pretrained_id, decoder, fallback)


def _check_shard_count(folder, world: int) -> None:
    """Refuse a --num-shards other than the one the cache's shards (or journals) were made with: two shard sets
    in one folder make it unreadable."""
    others = sorted(p.name for p in [*folder.shard_paths, *folder.journals]
                    if int(re.search(r"-of-(\d+)\.", p.name).group(1)) != world)
    if others:
        raise ExtractError(f"{folder.path}: holds shards of another shard count ({', '.join(others[:3])}"
                           f"{', ...' if len(others) > 3 else ''}), this run writes {world}; use the same "
                           "--num-shards as the cache, or another --cache")


def _already_done(plan: ExtractPlan) -> bool:
    """A finished shard of these settings holding every selected video, its texts made with these prompts, no
    journal, nothing to retry or refresh. Anything else goes through the writer, which names what differs."""
    from .store import texts_provenance
    from .texts import choose_templates

    c = plan.config
    if c.refresh_changed or not plan.shard.exists() or plan.shard.with_suffix(".journal").exists():
        return False
    try:
        prov, table, _, _ = read_shard(plan.shard)
        if c.spec.difference(prov, plan.pretrained_id, plan.manifest.dataset, plan.rank.world):
            return False
        if plan.rank.rank == 0 and (not plan.folder.texts_path.exists() or
                                    texts_provenance(plan.folder.texts_path).get("templates")
                                    != json.dumps(choose_templates(c.prompts, plan.manifest), sort_keys=True)):
            return False
    except CacheError:
        return False   # let the writer report it
    committed = {row["video_id"] for row in table}
    return all(v.video_id in committed for v in plan.selected)


def extract(config: ExtractConfig) -> ExtractResult:
    """Run one rank's extraction; see the module docstring. Raises ExtractError (and the manifest's,
    encoder's and store's own errors) for fatal problems."""
    from .decode import decoder_provenance, start_pool
    from .encoder import EncoderSpec, load_encoder
    from .store import ShardWriter
    from .texts import ensure_texts

    started, t_start = datetime.now(timezone.utc), time.monotonic()
    plan = plan_extraction(config)
    result = ExtractResult(plan.folder.path, EXIT_OK, selected=len(plan.selected), shard=plan.shard)
    if _already_done(plan):
        result.seconds = time.monotonic() - t_start
        return result
    encoder = load_encoder(EncoderSpec.of(config.spec, plan.rank.device(config.device)))   # fails before mkdir
    check_not_nested(plan.folder)   # an import may have made a cache here while the model loaded
    plan.folder.path.mkdir(parents=True, exist_ok=True)
    prov = config.spec.frame_provenance(encoder.provenance(), plan.manifest.dataset,
                                        decoder_provenance(plan.decoder, plan.fallback),
                                        plan.rank.rank, plan.rank.world)
    grid = config.grid if config.tokens == "grid" else None
    # the lock and the provenance check come first: a refused run changes nothing, texts.h5 included
    with ShardWriter(plan.shard, prov, encoder.feature_dim, grid=grid) as writer:
        if plan.rank.rank == 0:
            ensure_texts(plan.folder, plan.manifest, encoder, config.spec, config.prompts, command="extract")
        result.dropped = list(writer.dropped)
        todo, replace = _todo(plan, writer)
        result.todo = len(todo)
        run = ExtractRun(plan, encoder, writer, result, replace)
        try:
            run.start(todo)
            if todo:
                with start_pool(min(config.workers, len(todo)), config.policy, config.decode_timeout,
                                plan.decoder, config.decode_threads, encoder, plan.fallback) as pool:
                    run.loop(pool)
            writer.finalize()
        finally:
            run.progress.close()
        committed = writer.committed_ids
    result.exit_code, result.missing = exit_status([v.video_id for v in plan.selected], committed)
    result.seconds = time.monotonic() - t_start
    _log_run(plan, result, started, run.restarts)
    return result


def exit_status(selected_ids, committed) -> tuple[int, list[str]]:
    """(exit status, selected ids not in the cache): 0 all in, 1 some, 2 none (also what `import` exits)."""
    missing = [vid for vid in selected_ids if vid not in committed]
    if not missing:
        return EXIT_OK, missing
    return (EXIT_PARTIAL if len(missing) < len(selected_ids) else EXIT_FATAL), missing


def _todo(plan: ExtractPlan, writer) -> tuple[list, set[str]]:
    """(records to extract now, ids among them that replace a committed video whose file changed)."""
    committed = writer.committed_ids
    todo = [v for v in plan.selected if v.video_id not in committed]
    if plan.config.retry_failed:
        failed = read_failures(plan.folder.path)
        todo = [v for v in todo if v.video_id in failed]
    replace = set()
    if plan.config.refresh_changed:
        from .paths import VideoPathError, build_video_index
        index = build_video_index(plan.video_root)
        for v in plan.selected:
            rec = writer.record(v.video_id)
            if rec is None:
                continue
            try:
                st = os.stat(index.resolve(v))
            except (VideoPathError, OSError):
                continue   # a file that is gone: keep what was extracted from it
            if (st.st_size, st.st_mtime_ns) != (rec["source_size"], rec["source_mtime_ns"]):
                replace.add(v.video_id)
        todo = sorted([*todo, *(v for v in plan.selected if v.video_id in replace)], key=lambda v: v.video_id)
    return todo, replace


def _log_run(plan: ExtractPlan, result: ExtractResult, started, restarts: int) -> None:
    record = {
        "start": started.isoformat(timespec="seconds"),
        "end": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rank": plan.rank.rank, "world": plan.rank.world, "rank_source": plan.rank.source,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(plan.config).items()},
        **result_counts(result), "decode_restarts": restarts,
    }
    append_run_log(plan.folder.log_path, record)


def result_counts(result: ExtractResult) -> dict:
    """The counts of a run (extract or import) for extract_log.jsonl."""
    return {"selected": result.selected, "todo": result.todo, "committed": result.committed,
            "failed": len(result.failed), "missing": len(result.missing), "frames": result.frames,
            "seconds": round(result.seconds, 3), "frames_per_s": round(result.frames / max(result.seconds, 1e-9), 2),
            "exit_code": result.exit_code, "dropped_journal_commits": [vid for vid, _ in result.dropped]}


def main_exit_message(result: ExtractResult, done: str = "extracted", rows: str = "frames",
                      which: str = "selected") -> str:
    """The last line of an extract (or, with its words, of an import)."""
    if not result.todo and not result.missing and not result.committed:
        return f"nothing to do: all {result.selected} {which} videos are in the cache {result.cache_dir}"
    return (f"{result.committed} videos {done} ({result.frames} {rows}, "
            f"{result.frames / max(result.seconds, 1e-9):.1f} {rows}/s), {len(result.failed)} failed, "
            f"{len(result.missing)} of {result.selected} not in the cache; cache: {result.cache_dir}")


# --------------------------------------------------------------------------- files that are in no manifest

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
    import torch

    from .cache import CacheSpec, provenance_difference
    from .decode import check_decoders, decode_video, decoders_of_provenance, resolve_decoder
    from .encoder import EncoderSpec, load_encoder
    from .store import ProvenanceError

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
                        pixels = encoder.normalise_crops(msg[2][lo:lo + batch_size])
                        k = len(pixels)
                        pixels = torch.cat([pixels, pixels.new_zeros((batch_size - k, *pixels.shape[1:]))])
                        f, t = encoder.encode_pixels(pixels)
                        feats.append(f[:k].numpy().astype(np.float16))
                        toks.append(t[:k].numpy().astype(np.float16) if t is not None else None)
            yield path, FileFeatures(path, np.concatenate(feats),
                                     np.concatenate(toks) if toks[0] is not None else None, stamps)
        except Exception as err:   # noqa: BLE001 - one bad file is reported, the others go on
            yield path, err


def _plain_provenance(prov: dict) -> dict:
    from .store import normalised
    return normalised(json.loads(json.dumps(prov)))


# --------------------------------------------------------------------------------------- the run

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
        from .progress import ExtractProgress
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
        from .paths import VideoPathError, build_video_index
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
        import torch
        parts = self._take_batch()
        try:
            crops = parts[0][1] if len(parts) == 1 else np.concatenate([x for _, x in parts])
            pixels = self.encoder.normalise_crops(crops)
            k = len(pixels)
            if k < self.bs:   # fixed batch shape: see the module docstring
                pixels = torch.cat([pixels, pixels.new_zeros((self.bs - k, *pixels.shape[1:]))])
            self.in_flight.append((parts, k, self.encoder.encode_pixels_async(pixels)))
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `cmdcl-cache extract`")
