"""Time of a full `cmdcl` training run on a COIN-sized synthetic cache, through the real CLI.

    python benchmarks/coin_sized_training.py --device cuda --out benchmarks/results/coin_sized.json
    python benchmarks/coin_sized_training.py --videos 600 --epochs 2 --layers 1 --frames 16   # CPU smoke run

The cache has COIN's shape: 9,030 training videos (plus --test-videos) x 64 cached frames x 512 (ViT-B/16's
embedding size), 180 classes; features are class direction + noise, so the run also shows learning. It
times, each as its own `cmdcl-heads` process: `confounders build` (V_P 256, Z 512) and `train --model cmdcl`
(--epochs, --layers, --frames), and reports the mean epoch time from the run's summary.json, the steps skipped
for a non-finite gradient (and where the first was) from metrics.jsonl, and how far a failed run got.
`--cudnn-attention` lets training use cuDNN's fused attention (left out by default, see docs/reference/limitations.md).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import report_json  # noqa: E402

from cmdcl_cache.manifest.io import make_labels_json, write_manifest
from cmdcl_cache.cache.format import TextEmbeddings
from cmdcl_cache.ingest.synthetic import write_synthetic_cache


def write_coin_sized(work: Path, videos: int, test_videos: int, rows: int, dim: int, classes: int, seed: int):
    rng = np.random.default_rng(seed)
    class_dir = rng.standard_normal((classes, dim)).astype(np.float32)
    feats, records = {}, []
    for i in range(videos + test_videos):
        c = int(rng.integers(classes))
        vid = f"v{i:05d}"
        feats[vid] = (class_dir[c] + 3.0 * rng.standard_normal((rows, dim), dtype=np.float32)).astype(np.float16)
        records.append({"video_id": vid, "path": vid, "split": "train" if i < videos else "test",
                        "labels": {"task": f"t{c}"}})
    names = [f"task {c}" for c in range(classes)]
    per_prompt = (class_dir[:, None] + 0.5 * rng.standard_normal((classes, 4, dim))).astype(np.float32)
    texts = {"task": TextEmbeddings(names, names, ["{}"] * 4, per_prompt, TextEmbeddings.ensemble_of(per_prompt))}
    labels = make_labels_json("coin-sized", {"task": (False, [(f"t{c}", n) for c, n in enumerate(names)])},
                              "task", None, ["default"], "benchmarks/coin_sized_training.py", "generated")
    write_manifest(work / "manifest", records, labels)
    return write_synthetic_cache(work / "cache", feats, texts, provenance={"dataset": "coin-sized"})


def run(cmd: list[str], check: bool = True, metrics: Path | None = None, stop_after: int = 0) -> tuple[float, int]:
    """Seconds and exit code of cmd; with stop_after, interrupted (SIGINT) once `metrics` has that many epochs."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    while proc.poll() is None:
        if stop_after and metrics.exists() and len(metrics.read_text().splitlines()) >= stop_after:
            proc.send_signal(signal.SIGINT)
            proc.wait()
            break
        time.sleep(0.2)
    if check and proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return time.perf_counter() - t0, proc.returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=9030)
    p.add_argument("--test-videos", type=int, default=2797)
    p.add_argument("--rows", type=int, default=64, help="cached frames per video")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=180)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-points", type=int, default=65536, help="frames clustered by k-means")
    p.add_argument("--device", default="auto")
    p.add_argument("--cudnn-attention", action="store_true", help="allow cuDNN's fused attention in training")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="the trainer's --precision (fp32 = TF32 matmuls on CUDA, the default)")
    p.add_argument("--stop-after", type=int, default=0, help="interrupt training after this many epochs "
                                                               "(the schedule stays that of --epochs)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cmdcl-coin-sized-"))
    t0 = time.perf_counter()
    cache = write_coin_sized(work, args.videos, args.test_videos, args.rows, args.dim, args.classes, seed=0)
    write_s = time.perf_counter() - t0
    cli = [sys.executable, "-m", "cmdcl_heads.cli"]
    dataset = str(work / "manifest")
    confounders_s, _ = run(cli + ["confounders", "build", "--cache", str(cache), "--dataset", dataset,
                               "--max-points", str(args.max_points)])
    metrics_file = work / "run" / "metrics.jsonl"
    train_s, train_rc = run(cli + ["train", "--cache", str(cache), "--dataset", dataset, "--model", "cmdcl",
                                   "--epochs", str(args.epochs), "--layers", str(args.layers),
                                   "--frames", str(args.frames), "--batch-size", str(args.batch_size),
                                   "--device", args.device, "--precision", args.precision, "--quiet",
                                   "--out", str(work / "run")]
                             + (["--cudnn-attention"] if args.cudnn_attention else []), check=False,
                             metrics=metrics_file, stop_after=args.stop_after)
    epochs = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    summary_file = work / "run" / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    times = [r["epoch_seconds"] for r in epochs]
    figures = {"videos": args.videos, "test_videos": args.test_videos, "rows": args.rows, "dim": args.dim,
               "epochs": args.epochs, "layers": args.layers, "frames": args.frames, "batch_size": args.batch_size,
               "cudnn_attention": args.cudnn_attention, "precision": args.precision, "write_cache_s": round(write_s, 1),
               "confounders_build_s": round(confounders_s, 1), "train_wall_s": round(train_s, 1),
               "train_exit_code": train_rc, "stop_after": args.stop_after, "epochs_done": len(epochs),
               "mean_epoch_s": round(sum(times) / len(times), 2) if times else None,
               "skipped_steps": sum(r.get("skipped_steps", 0) for r in epochs),
               "first_nonfinite_grads": next(({"epoch": r["epoch"], **r["nonfinite_grads"]} for r in epochs
                                              if "nonfinite_grads" in r), None),
               "device": summary.get("device"), "data_mode": summary.get("data_mode"),
               "test_metrics": summary.get("metrics")}
    report_json(figures, args.out)


if __name__ == "__main__":
    main()
