"""Which part of the manifest this process extracts: rank and world size from the launcher (pure).

Sources, in order of precedence:

1. `--shard-index/--num-shards` flags (both or neither).
2. The launcher's environment:
   - torchrun: `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (device `cuda:LOCAL_RANK`);
   - otherwise Slurm tasks: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` (device `cuda:SLURM_LOCALID`);
   - a Slurm job array (`SLURM_ARRAY_TASK_ID` - `SLURM_ARRAY_TASK_MIN`, `SLURM_ARRAY_TASK_COUNT`) is an
     outer level: array task a of A running w ranks each is rank `a * w + r` of `A * w`.
3. Nothing: rank 0 of 1.

Flags win over an environment that describes a single process (world 1). When the environment describes a
multi-process world that disagrees with the flags, that is an error: eight torchrun ranks all told
`--shard-index 0` would write the same shard eight times.

Videos are split by sorted id, `ids[rank::world]`, over the whole manifest (before `--split`), so a video
always lands in the same shard whatever split a run selects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping


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


def split_ids(ids: Iterable[str], rank: int, world: int) -> list[str]:
    """This rank's videos: every world-th of the sorted ids, starting at rank."""
    if not 0 <= rank < world:
        raise ValueError(f"split: rank {rank} is outside 0..{world - 1}")
    return sorted(ids)[rank::world]
