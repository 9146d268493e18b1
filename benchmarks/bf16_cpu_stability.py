"""Does the COIN-sized cmdcl training stay finite in bf16 when no CUDA kernel is involved? (CPU, in-process)

    python benchmarks/bf16_cpu_stability.py --stop-after 7 --out benchmarks/results/bf16_cpu.json

Two bf16 H100 runs of `coin_sized_training.py` (H=8, T=64, batch 64, lr 1e-3, 30- and 10-epoch schedules) went
non-finite in epoch 4: finite losses, then every weight NaN after one step. This script trains the same head on
the same kind of cache (9,030 training videos x 64 frames x 512, 180 classes; --test-videos kept small) with
bf16 autocast on the CPU, which the trainer never enables itself (`--precision bf16` autocasts on GPU only), so it swaps
`cmdcl_heads.train.autocast` for a CPU bf16 one. Everything else is `cmdcl_heads.train.train`: the schedule
of --epochs, clipping, the non-finite-gradient guard. It stops after --stop-after epochs and prints, per epoch,
the loss, the steps skipped for a non-finite gradient and the largest gradient norm before clipping.
A CPU run cannot show what a CUDA kernel does; it shows whether the model's own bf16 arithmetic goes non-finite.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import machine, report_json, stamp  # noqa: E402
from coin_sized_training import write_coin_sized  # noqa: E402

from cmdcl_heads import train as train_module  # noqa: E402
from cmdcl_heads.config import HeadConfig, TrainConfig  # noqa: E402


class Stop(Exception):
    pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=9030)
    p.add_argument("--test-videos", type=int, default=300)
    p.add_argument("--epochs", type=int, default=30, help="the schedule's length (as in the first H100 run)")
    p.add_argument("--stop-after", type=int, default=7, help="epochs actually run")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="cmdcl-bf16-cpu-"))
    cache = write_coin_sized(work, args.videos, args.test_videos, 64, 512, 180, seed=0)
    subprocess.run([sys.executable, "-m", "cmdcl_heads.cli", "confounders", "build", "--cache", str(cache),
                    "--dataset", str(work / "manifest"), "--max-points", "65536"], check=True,
                   stdout=subprocess.DEVNULL)
    bf16 = args.precision == "bf16"
    train_module.autocast = lambda device, precision: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    norms: list[float] = []
    real_norms = train_module.grad_norms

    def recording_norms(params):
        total, per_param = real_norms(params)
        norms.append(float(total))   # a host sync per step: fine for this diagnostic, not for the trainer
        return total, per_param

    train_module.grad_norms = recording_norms
    epochs = []

    def end_of_epoch(epoch, record):
        row = {"epoch": epoch, "train_loss": round(record["train_loss"], 4), "skipped_steps": record["skipped_steps"],
               "max_grad_norm": round(max(norms), 2), "seconds": round(record["epoch_seconds"], 1),
               "test_top1": round(record["eval"]["top1"], 4) if "eval" in record else None}
        if "nonfinite_grads" in record:
            row["nonfinite_grads"] = record["nonfinite_grads"]
        epochs.append(row)
        norms.clear()
        print(row, flush=True)
        if epoch >= args.stop_after:
            raise Stop

    opts = TrainConfig(cache=str(cache), dataset=str(work / "manifest"), out=str(work / "run"),
                       epochs=args.epochs, batch_size=64, lr=1e-3, device="cpu", quiet=True, data_mode="memory",
                       precision=args.precision, eval_each_epoch=True)
    t0 = time.perf_counter()
    try:
        train_module.train(opts, HeadConfig(model="cmdcl", layers=8, frames=64), on_epoch_end=end_of_epoch)
    except Stop:
        pass
    report_json({"machine": machine(), "measured": stamp(), "precision": args.precision,
                 "videos": args.videos, "schedule_epochs": args.epochs, "epochs_run": len(epochs),
                 "steps": len(epochs) * -(-args.videos // 64),
                 "skipped_steps": sum(e["skipped_steps"] for e in epochs),
                 "train_seconds": round(time.perf_counter() - t0, 1), "per_epoch": epochs}, args.out)


if __name__ == "__main__":
    main()
