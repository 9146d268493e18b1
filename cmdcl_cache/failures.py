"""`failures.jsonl` and `extract_log.jsonl`: append-only JSON Lines logs in the cache folder.

Every rank appends to the same files, one `os.write` of one whole line on a descriptor opened with
O_APPEND, so lines from different processes do not interleave (on a local file system). A line cut by a
crash is skipped on reading. A video may appear several times (a retry that failed again); the last line
wins, and a video that is committed in a shard is not failed, whatever the log says.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

FAILURES_FILE = "failures.jsonl"
RUN_LOG = "extract_log.jsonl"
STAGES = ("open", "decode", "encode", "write")


def append_line(path: str | Path, record: dict) -> None:
    data = (json.dumps(record, sort_keys=False) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as err:   # a full disk's error names no file
        raise OSError(err.errno, err.strerror, str(path)) from None


def read_lines(path: str | Path) -> list[dict]:
    """The JSON objects of a line file; a name that is no regular file (a link to /dev/zero, a FIFO) is
    refused before reading, since reading it would never end or would fill the memory."""
    path = Path(path)
    if not path.exists():
        return []
    if not stat.S_ISREG(path.stat().st_mode):
        raise ValueError(f"{path}: not a regular file (a FIFO, socket or device, maybe through a link); "
                         "cmdcl writes this log as a plain file: remove it")
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn by a crash
        if isinstance(obj, dict):
            out.append(obj)
    return out


def record_failure(cache_dir: str | Path, video_id: str, path: str, stage: str, error: str,
                   seconds: float, rank: int) -> dict:
    if stage not in STAGES:
        raise ValueError(f"unknown failure stage {stage!r}")
    record = {"video_id": video_id, "path": str(path), "stage": stage, "error": error,
              "seconds": round(float(seconds), 3), "rank": int(rank)}
    append_line(Path(cache_dir) / FAILURES_FILE, record)
    return record


def read_failures(cache_dir: str | Path) -> dict[str, dict]:
    """The last failure record of each video listed in failures.jsonl."""
    return {r["video_id"]: r for r in read_lines(Path(cache_dir) / FAILURES_FILE) if "video_id" in r}


def append_run_log(folder_log: str | Path, record: dict) -> None:
    """One line of extract_log.jsonl; a read-only cache that had nothing to write still answers (a warning)."""
    import sys
    try:
        append_line(folder_log, record)
    except OSError as err:
        print(f"warning: cannot append to {folder_log} ({err.strerror})", file=sys.stderr)
