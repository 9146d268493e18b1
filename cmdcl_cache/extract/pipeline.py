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

import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Mapping

from cmdcl_cache.cache.folder import CacheFolder, check_not_nested, for_writing, split_ids
from cmdcl_cache.cache.format import read_shard, texts_provenance
from cmdcl_cache.cache.provenance import CacheSpec
from cmdcl_cache.cache.runlog import EXIT_OK, ExtractResult, append_run_log, exit_status, read_failures, result_counts
from cmdcl_cache.cache.sampling import SamplingPolicy
from cmdcl_cache.config import check_choices, option
from cmdcl_cache.errors import CacheError
from cmdcl_cache.extract.run import ExtractRun
from cmdcl_cache.manifest.prompts import PROMPTS_HELP, choose_templates


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
              "frames no sample needs: 1.3-2.3x decord's frames per CPU second here, same pixels). An installed "
              "decoder hook (entry-point group cmdcl_cache.decoder_hooks) may take over; the tests install one.")
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
    from cmdcl_cache.extract.decode import check_decoders, run_decoders
    from cmdcl_cache.extract.encoder import EncoderSpec, check_encoder_spec
    from cmdcl_cache.manifest.io import load_manifest

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
    from cmdcl_cache.cache.writer import ShardWriter
    from cmdcl_cache.extract.decode import decoder_provenance
    from cmdcl_cache.extract.encoder import EncoderSpec, load_encoder
    from cmdcl_cache.extract.pools import start_pool
    from cmdcl_cache.extract.texts import ensure_texts

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


def _todo(plan: ExtractPlan, writer) -> tuple[list, set[str]]:
    """(records to extract now, ids among them that replace a committed video whose file changed)."""
    committed = writer.committed_ids
    todo = [v for v in plan.selected if v.video_id not in committed]
    if plan.config.retry_failed:
        failed = read_failures(plan.folder.path)
        todo = [v for v in todo if v.video_id in failed]
    replace = set()
    if plan.config.refresh_changed:
        from cmdcl_cache.manifest.paths import VideoPathError, build_video_index
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `cmdcl-cache extract`")


class RankError(ValueError):
    """Rank information is missing, malformed or contradictory."""


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world: int
    local_rank: int | None = None   # index of the GPU on this node, when the launcher says
    source: str = "default"         # flags | torchrun | slurm | slurm-array | slurm-array+torchrun ...

    def device(self, requested: str) -> str:
        """`cuda` becomes `cuda:<local rank>` under a launcher; explicit indices and `cpu` are kept."""
        if requested == "cuda" and self.local_rank is not None:
            return f"cuda:{self.local_rank}"
        return requested


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise RankError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _check(rank: int, world: int, what: str) -> None:
    if world < 1:
        raise RankError(f"{what}: world size must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise RankError(f"{what}: rank {rank} is outside 0..{world - 1}")


def _from_env(env: Mapping[str, str]) -> RankInfo | None:
    inner = None
    if "RANK" in env or "WORLD_SIZE" in env:
        if not ("RANK" in env and "WORLD_SIZE" in env):
            raise RankError("torchrun environment is incomplete: need both RANK and WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else None
        inner = RankInfo(_int(env, "RANK"), _int(env, "WORLD_SIZE"), local, "torchrun")
        _check(inner.rank, inner.world, "RANK/WORLD_SIZE")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else None
        inner = RankInfo(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), local, "slurm")
        _check(inner.rank, inner.world, "SLURM_PROCID/SLURM_NTASKS")
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        count = _int(env, "SLURM_ARRAY_TASK_COUNT")
        task = _int(env, "SLURM_ARRAY_TASK_ID") - (_int(env, "SLURM_ARRAY_TASK_MIN")
                                                    if "SLURM_ARRAY_TASK_MIN" in env else 0)
        _check(task, count, "SLURM_ARRAY_TASK_ID (minus SLURM_ARRAY_TASK_MIN)/SLURM_ARRAY_TASK_COUNT")
        if count > 1:
            if inner is None:
                return RankInfo(task, count, None, "slurm-array")
            return RankInfo(task * inner.world + inner.rank, count * inner.world, inner.local_rank,
                            f"slurm-array+{inner.source}")
    return inner


def detect_rank(shard_index: int | None = None, num_shards: int | None = None,
                env: Mapping[str, str] | None = None) -> RankInfo:
    env = os.environ if env is None else env
    found = _from_env(env)
    if (shard_index is None) != (num_shards is None):
        raise RankError("give both --shard-index and --num-shards, or neither")
    if shard_index is None:
        return found or RankInfo(0, 1)
    _check(shard_index, num_shards, "--shard-index/--num-shards")
    if found is not None and found.world > 1 and (found.rank, found.world) != (shard_index, num_shards):
        raise RankError(f"--shard-index {shard_index} --num-shards {num_shards} contradict the launcher "
                        f"({found.source}: rank {found.rank} of {found.world}); drop the flags or "
                        "run without the launcher")
    local = found.local_rank if found is not None else None
    return RankInfo(shard_index, num_shards, local, "flags")
