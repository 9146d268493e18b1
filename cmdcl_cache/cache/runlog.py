"""`failures.jsonl` and `extract_log.jsonl`: append-only JSON Lines logs in the cache folder.

Every rank appends to the same files, one `os.write` of one whole line on a descriptor opened with
O_APPEND, so lines from different processes do not interleave (on a local file system). A line cut by a
crash is skipped on reading. A video may appear several times (a retry that failed again); the last line
wins, and a video that is committed in a shard is not failed, whatever the log says.

A run's outcome is also here, the same for extract and import: `ExtractResult`, its exit status
(0 all done, 1 some videos failed, 2 nothing could be done) and its one-line summary.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import dataclass, field
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
    try:
        append_line(folder_log, record)
    except OSError as err:
        print(f"warning: cannot append to {folder_log} ({err.strerror})", file=sys.stderr)


EXIT_OK, EXIT_PARTIAL, EXIT_FATAL = 0, 1, 2


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


def exit_status(selected_ids, committed) -> tuple[int, list[str]]:
    """(exit status, selected ids not in the cache): 0 all in, 1 some, 2 none (also what `import` exits)."""
    missing = [vid for vid in selected_ids if vid not in committed]
    if not missing:
        return EXIT_OK, missing
    return (EXIT_PARTIAL if len(missing) < len(selected_ids) else EXIT_FATAL), missing


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
