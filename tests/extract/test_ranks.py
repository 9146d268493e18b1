"""Rank detection from flags, torchrun and Slurm, and the deterministic split of ids."""

import pytest

from cmdcl_cache.extract.pipeline import RankError, detect_rank
from cmdcl_cache.cache.folder import split_ids


def test_default_is_rank_zero_of_one():
    r = detect_rank(env={})
    assert (r.rank, r.world, r.device("cuda")) == (0, 1, "cuda")


def test_torchrun_sets_rank_world_and_device():
    r = detect_rank(env={"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (r.rank, r.world, r.source) == (3, 4, "torchrun")
    assert r.device("cuda") == "cuda:1" and r.device("cpu") == "cpu" and r.device("cuda:0") == "cuda:0"


def test_torchrun_wins_over_slurm_tasks():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    assert (detect_rank(env=env).rank, detect_rank(env=env).world) == (5, 8)


def test_slurm_tasks_and_array():
    r = detect_rank(env={"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_LOCALID": "0"})
    assert (r.rank, r.world, r.device("cuda")) == (2, 3, "cuda:0")
    r = detect_rank(env={"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5",
                         "SLURM_ARRAY_TASK_COUNT": "4"})
    assert (r.rank, r.world, r.source) == (2, 4, "slurm-array")
    # array of 4 tasks, each with 2 Slurm tasks: array task 1, procid 1 -> rank 3 of 8
    r = detect_rank(env={"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4",
                         "SLURM_PROCID": "1", "SLURM_NTASKS": "2"})
    assert (r.rank, r.world) == (3, 8)


def test_flags_win_over_single_process_env_and_conflicts_are_errors():
    r = detect_rank(1, 2, env={"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (r.rank, r.world, r.source) == (1, 2, "flags")
    assert detect_rank(1, 4, env={"RANK": "1", "WORLD_SIZE": "4"}).rank == 1
    with pytest.raises(RankError, match="contradict"):
        detect_rank(0, 2, env={"RANK": "1", "WORLD_SIZE": "4"})
    with pytest.raises(RankError, match="both"):
        detect_rank(1, None, env={})
    with pytest.raises(RankError, match="outside"):
        detect_rank(2, 2, env={})
    with pytest.raises(RankError, match="not an integer"):
        detect_rank(env={"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(RankError, match="incomplete"):
        detect_rank(env={"RANK": "0"})


def test_split_covers_every_id_exactly_once():
    ids = [f"v{i:03d}" for i in range(103)][::-1]
    parts = [split_ids(ids, r, 4) for r in range(4)]
    assert sorted(sum(parts, [])) == sorted(ids)
    assert parts[0][:2] == ["v000", "v004"]
    assert split_ids(ids, 1, 4) == split_ids(list(reversed(ids)), 1, 4)  # order of input does not matter
