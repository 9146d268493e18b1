"""`cmdcl-cache import` against a plain copy and a plain read of the same bytes, side by side in one run.

    PYTHONPATH=$PWD python benchmarks/import_throughput.py              # 1,000 videos x 64 x 512 float16, ~1 min
    PYTHONPATH=$PWD python benchmarks/import_throughput.py --videos 200 --no-write

Source: one `<id>.npy` [64, 512] float16 per video (64 MiB in all, what ActionFormer-style code and export-npy
use), timestamps from `--fps 1`. Modes, run in interleaved rounds (cp, read, import, import --no-durable,
cp, ...), each into a fresh destination, so that a neighbour's load on a shared machine hits all alike:

- cp:      `cp -r` of the source folder (reads and writes the bytes; no fsync);
- read:    every source file opened and read to the end in Python (the disk side alone);
- sha256:  the import's first pass alone (`importer.plan_import`: listing, matching, sha256 of every file);
- import:  `importer.import_features` (sha256 pass, np.load + checks per video, journal with fsync per
           group of 256 videos, finalize into the HDF5 shard), the default;
- import --no-durable: the same without the fsyncs.

Before each timed mode, `sync` writes back what the previous mode left dirty (so that its writeback does not
slow the next one), and the source files' pages are dropped from the page cache (posix_fadvise DONTNEED),
so every mode starts from the disk; on a virtual machine the host may still cache them. What a mode writes
stays in the page cache as the tool leaves it (cp and --no-durable do not fsync). Medians over the rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine, report_json, stamp, update_section  # noqa: E402


def write_source(work: Path, videos: int, frames: int, dim: int, seed: int) -> tuple[Path, Path]:
    """A manifest of `videos` videos and one float16 .npy per video; returns (manifest, source folder)."""
    from cmdcl_cache.manifest.io import make_labels_json, write_manifest

    rng = np.random.default_rng(seed)
    src = work / "src"
    src.mkdir()
    records = []
    for i in range(videos):
        vid = f"v{i:05d}"
        np.save(src / f"{vid}.npy", rng.standard_normal((frames, dim)).astype(np.float16))
        records.append({"video_id": vid, "path": vid, "split": "train" if i % 4 else "test",
                        "labels": {"label": f"c{i % 4}"}})
    labels = make_labels_json("importbench", {"label": (False, [(f"c{c}", f"class {c}") for c in range(4)])},
                              "label", None, ["default"], "benchmarks/import_throughput.py", "generated")
    write_manifest(work / "manifest", records, labels)
    return work / "manifest", src


def evict(folder: Path) -> None:
    """Drop the clean pages of every file under folder from the page cache."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_all(src: Path) -> int:
    n = 0
    for path in sorted(src.iterdir()):
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                n += len(chunk)
    return n


def one_round(manifest: Path, src: Path, out: Path, r: int) -> dict[str, float]:
    from cmdcl_cache.ingest.importer import ImportConfig
    from cmdcl_cache.ingest.importer import import_features
    from cmdcl_cache.ingest.plan import plan_import

    def config(cache, durable=True):
        return ImportConfig(dataset=str(manifest), source=str(src), format="npy", cache=str(cache),
                            model="bench", fps=1.0, durable=durable, quiet=True)

    times = {}
    modes = {
        "cp": lambda: subprocess.run(["cp", "-r", str(src), str(out / f"cp{r}")], check=True),
        "read": lambda: read_all(src),
        "sha256": lambda: plan_import(config(out / f"plan{r}")).source.close(),
        "import": lambda: import_features(config(out / f"imp{r}")),
        "import --no-durable": lambda: import_features(config(out / f"nod{r}", durable=False)),
    }
    for name, run in modes.items():
        os.sync()   # the previous mode's dirty pages are written back before this one starts, not during it
        evict(src)
        t0 = time.perf_counter()
        result = run()
        times[name] = time.perf_counter() - t0
        if name.startswith("import"):
            assert result.exit_code == 0 and result.committed == len(list(src.iterdir())), result
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=1000)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="Where the files go (default: a temporary folder).")
    ap.add_argument("--out", type=Path, default=None, help="Also write the figures as JSON here.")
    ap.add_argument("--no-write", action="store_true", help="Do not update BENCHMARKS.md.")
    args = ap.parse_args()
    t_start, load_before = time.perf_counter(), os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="import_bench_", dir=args.workdir))
    try:
        manifest, src = write_source(work, args.videos, args.frames, args.dim, args.seed)
        mib = sum(p.stat().st_size for p in src.iterdir()) / 2**20
        rounds = []
        for r in range(args.rounds):
            out = work / f"out{r}"
            out.mkdir()
            rounds.append(one_round(manifest, src, out, r))
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(t[k] for t in rounds) for k in rounds[0]}
    figures = {"videos": args.videos, "frames": args.frames, "dim": args.dim, "source_mib": round(mib, 1),
               "rounds": [{k: round(v, 3) for k, v in t.items()} for t in rounds],
               "median_s": {k: round(v, 3) for k, v in med.items()},
               "median_mib_per_s": {k: round(mib / v, 1) for k, v in med.items()},
               "import_vs_cp": round(med["import"] / med["cp"], 2),
               "import_no_durable_vs_cp": round(med["import --no-durable"] / med["cp"], 2),
               "import_vs_read": round(med["import"] / med["read"], 2),
               "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
               "machine": machine(), "command": command_line(), "seconds": round(time.perf_counter() - t_start, 1)}
    report_json(figures, args.out)
    if not args.no_write:
        update_section("import", render(figures))


def render(f: dict) -> str:
    rows = "\n".join(f"| {k} | {f['median_s'][k]:.3f} | {f['median_mib_per_s'][k]:.0f} | "
                     f"{f['median_s'][k] / f['median_s']['cp']:.2f} | "
                     f"{', '.join(f'{t[k]:.3f}' for t in f['rounds'])} |" for k in f["median_s"])
    return f"""### `cmdcl-cache import` vs cp and a plain read (`benchmarks/import_throughput.py`)

Command: `{f['command']}`  
Machine: {f['machine']}  
Measured {stamp()}; whole script {f['seconds']} s; 1-minute load average {f['load_average_1min'][0]} before,
{f['load_average_1min'][1]} after (other jobs shared the cores).

Source: {f['videos']:,} videos x {f['frames']} x {f['dim']} float16 `.npy` ({f['source_mib']} MiB), `--format npy --fps 1`;
`sync`, then source pages dropped from the page cache, before every mode; medians of {len(f['rounds'])} interleaved rounds.

| mode | median s | MiB/s | time vs cp | each round (s) |
|---|---|---|---|---|
{rows}

import / cp = {f['import_vs_cp']}, import --no-durable / cp = {f['import_no_durable_vs_cp']}, import / read = {f['import_vs_read']}.
"""


if __name__ == "__main__":
    main()
