"""The causal study (BENCHMARKS.md "Causal study"): does any CMDCL variant beat text4vis on the shifted split?

    PYTHONPATH=$PWD python benchmarks/study.py tune      # settings chosen on in-distribution val only
    PYTHONPATH=$PWD python benchmarks/study.py report    # every world and regime, 5 data x 3 training seeds

The protocol is written in BENCHMARKS.md before the runs and repeated here as code: the worlds and regimes
(`WORLDS`, `REGIMES`), the grids (`GRID`) and the selection rule (`select`). Every run is one line of
benchmarks/results/study_runs.jsonl, keyed by (stage, world, regime, row, data seed, training seed); a
rerun skips the runs already there, so the study resumes after a kill. `tune` never evaluates a shifted
split; `report` reads the settings that `tune` wrote (benchmarks/results/study_selection.json).

Runs go through cmdcl_heads.train.train in two worker processes (one torch thread each), with the same
epochs, layers and learning rate for every head (benchmarks/confounded.py's defaults); the checkpoint is
chosen on val. The PNGs a run folder normally gets are skipped (they cost a fifth of a run).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from confounded import SCMConfig, build_dictionaries, train_eval, write_benchmark  # noqa: E402

RUNS = HERE / "results" / "study_runs.jsonl"
SELECTION = HERE / "results" / "study_selection.json"

# Regimes: the fine (action) vocabulary spans a small part of the space, or all of it (COIN: 778 steps in 512).
REGIMES = {"low-rank": {"dim": 64, "actions": 12}, "full-rank": {"dim": 64, "actions": 96}}
# Worlds, fixed before any run. `tune` is the only one whose data any setting was chosen on.
WORLDS = {
    "tune": {"scene_in_span": 0.3},
    "H1 stronger confounder, more scenes": {"scene_in_span": 0.3, "rho": 0.97, "beta": 2.0, "scenes": 16},
    "H2 noisier steps, moving scenes": {"scene_in_span": 0.6, "sigma": 1.5, "tau": 1.0, "scene_switch": 0.25},
}
TUNE_DATA_SEEDS, TUNE_TRAIN_SEEDS = (100, 101, 102), (0, 1)
REPORT_DATA_SEEDS, REPORT_TRAIN_SEEDS = (0, 1, 2, 3, 4), (0, 1, 2)

# mechanism -> (field, where it lives, grid); every value of the grid is tried on `tune` only
GRID = {"static": ("static_removal", "head", (0.5, 1.0)),
        "reweight": ("reweight_strata", "train", (5, 10, 20))}


# The study's cmdcl rows ran when the frame-dictionary approximator was cmdcl's default (issue 14); they stay
# that reading. Issue 20 added one row, announced in BENCHMARKS.md before its runs: the figure-4 approximator.
DICTIONARY = {"approximator": "dictionary"}
FIGURE4_ROW = "cmdcl-figure4"


def rows(selection: dict | None) -> dict[str, tuple[str, str, dict, dict]]:
    """row -> (cache variant, model, HeadConfig extras, TrainConfig extras) of the report stage."""
    out = {"ref-deconfounded": ("nobg", "text4vis", {}, {}), "text4vis": ("full", "text4vis", {}, {}),
           "cmdcl": ("full", "cmdcl", dict(DICTIONARY), {}),
           "cmdcl-project": ("full", "cmdcl", {"mediator_mode": "project", **DICTIONARY}, {})}
    if selection is not None:
        chosen = {}
        for mech, (field, where, _grid) in GRID.items():
            value = selection[mech]
            chosen[mech] = ({field: value, **DICTIONARY}, {}) if where == "head" else (dict(DICTIONARY), {field: value})
            out[f"cmdcl-{mech}"] = ("full", "cmdcl", *chosen[mech])
        out["cmdcl-static+reweight"] = ("full", "cmdcl", chosen["static"][0], chosen["reweight"][1])
    out[FIGURE4_ROW] = ("full", "cmdcl", {"approximator": "text"}, {})
    out["ref-shortcut"] = ("bgonly", "text4vis", {}, {})
    return out


def tune_rows() -> dict[str, tuple[str, str, dict, dict]]:
    out = {}
    for mech, (field, where, grid) in GRID.items():
        for value in grid:
            extra = ({field: value, **DICTIONARY}, {}) if where == "head" else (dict(DICTIONARY), {field: value})
            out[f"{mech}={value}"] = ("full", "cmdcl", *extra)
    return out


def select(results: list[dict], regime: str) -> dict:
    """The pre-registered rule: per mechanism, the grid value with the highest mean val top-1 on `tune`
    (ties: the later, stronger value). Nothing else is looked at."""
    chosen = {}
    for mech, (_field, _where, grid) in GRID.items():
        means = {}
        for value in grid:
            vals = [r["val"] for r in results if r["regime"] == regime and r["row"] == f"{mech}={value}"]
            means[value] = float(np.mean(vals))
        best = max(means.values())
        chosen[mech] = [v for v in grid if means[v] == best][-1]
        chosen[f"{mech}_val_means"] = {str(k): round(v * 100, 2) for k, v in means.items()}
    return chosen


# --------------------------------------------------------------------------------------------- runs

def run_id(key: list, settings: dict) -> tuple:
    """A run is the same run only with the same key AND the same settings (epochs, the switches' values):
    a 1-epoch smoke test or an earlier selection must never stand in for the real run."""
    return tuple(key), json.dumps(settings, sort_keys=True)


def recorded_runs() -> list[dict]:
    if not RUNS.exists():
        return []
    return [as_recorded(json.loads(line)) for line in RUNS.read_text().splitlines() if line.strip()]


def as_recorded(run: dict) -> dict:
    """A cmdcl run recorded before `--approximator` existed had the dictionary reading: say so in its settings."""
    head = run["settings"]["head"]
    if run["row"] != "text4vis" and not run["row"].startswith("ref-") and "approximator" not in head:
        run["settings"] = {**run["settings"], "head": {**head, **DICTIONARY}}
    return run


def _run(job: dict) -> dict:
    import warnings

    import torch

    import cmdcl_heads.report as report
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    report.write_outputs = lambda *a, **k: None   # the study reads numbers, not plots
    args = argparse.Namespace(**job["args"])
    acc = train_eval(Path(job["cache"]), Path(job["manifest"]), Path(job["run"]), job["model"], job["seed"], args,
                     job["head"], splits=tuple(job["splits"]), train_extra=job["train"])
    import shutil
    shutil.rmtree(job["run"], ignore_errors=True)
    fields = dict(zip(("stage", "world", "regime", "row", "data_seed", "seed"), job["key"]))
    return {"key": job["key"], "settings": job["settings"], **fields, **acc}


def prepare(work: Path, world: str, regime: str, data_seed: int, args) -> dict[str, Path]:
    cfg = replace(SCMConfig(), **WORLDS[world], **REGIMES[regime], seed=data_seed)
    folder = work / f"{world.split()[0]}-{regime}-d{data_seed}"
    if (folder / "ready").exists():
        paths = {"manifest": folder / "manifest"}
        paths.update({t: folder / "cache" / "confounded" / t for t in ("full", "nobg", "bgonly")})
        return paths
    paths = write_benchmark(folder, cfg)
    build_dictionaries(paths["full"], paths["manifest"], args)
    (folder / "ready").write_text("")
    return paths


def run_stage(stage: str, table: dict, worlds, regimes, data_seeds, train_seeds, splits, args, work: Path,
              execute: bool = True) -> list[dict]:
    """Run what is not recorded yet (execute=False: nothing, the recorded runs only) and return the stage's runs."""
    from multiprocessing import get_context

    from rich.progress import Progress

    have = {run_id(r["key"], r["settings"]) for r in recorded_runs()}
    jobs, wanted = [], set()
    for world in worlds:
        for regime in regimes:
            for ds in data_seeds:
                paths = prepare(work, world, regime, ds, args) if execute else {}
                for row, (variant, model, head, train) in table.items():
                    for seed in (train_seeds if not row.startswith("ref-") else train_seeds[:1]):
                        key = [stage, world, regime, row, ds, seed]
                        settings = {"epochs": args.epochs, "head": head, "train": train}
                        wanted.add(run_id(key, settings))
                        if run_id(key, settings) in have:
                            continue
                        if not execute:
                            continue
                        jobs.append({"key": key, "settings": settings, "cache": str(paths[variant]),
                                     "manifest": str(paths["manifest"]),
                                     "run": str(work / "runs" / "-".join(map(str, key)).replace(" ", "_")),
                                     "model": model, "seed": seed, "head": head, "train": train,
                                     "splits": splits, "args": vars(args)})
    RUNS.parent.mkdir(parents=True, exist_ok=True)
    with get_context("spawn").Pool(args.workers) as pool, Progress() as bar, RUNS.open("a") as log:
        task = bar.add_task(f"{stage}: {len(jobs)} runs", total=len(jobs))
        for result in pool.imap_unordered(_run, jobs):
            log.write(json.dumps(result) + "\n")
            log.flush()
            bar.advance(task)
    return [r for r in recorded_runs() if run_id(r["key"], r["settings"]) in wanted]


# ------------------------------------------------------------------------------------------- report

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        14: 2.145}


def paired(results: list[dict], row: str, base: str, split: str) -> tuple[float, float, float]:
    """Mean difference row - base on `split` in points and its 95 % t interval over DATA seeds: the training
    seeds of one dataset are averaged first (they share the data, so they are not independent pairs)."""
    per_data = []
    for ds in sorted({r["data_seed"] for r in results}):
        a = {r["seed"]: r[split] for r in results if r["row"] == row and r["data_seed"] == ds}
        b = {r["seed"]: r[split] for r in results if r["row"] == base and r["data_seed"] == ds}
        common = sorted(set(a) & set(b))
        per_data.append(np.mean([a[s] - b[s] for s in common]))
    d = 100 * np.asarray(per_data)
    half = T975[len(d) - 1] * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def report_tables(results: list[dict], table_rows: list[str]) -> tuple[str, dict]:
    lines, verdict = [], {}
    for world in WORLDS:
        for regime in REGIMES:
            rs = [r for r in results if r["world"] == world and r["regime"] == regime]
            if not rs:
                continue
            lines += [f"\n**{world}, {regime}** (`{ {**WORLDS[world], **REGIMES[regime]} }`)\n",
                      "| row | val | test_id (in dist.) | test (shifted) | shifted − text4vis [95 % CI] | "
                      "in dist. − text4vis [95 % CI] | runs |", "|---|---|---|---|---|---|---|"]
            for row in table_rows:
                r = [x for x in rs if x["row"] == row]
                if not r:
                    continue
                cells = [f"{100 * np.mean([x[s] for x in r]):.1f}" for s in ("val", "test_id", "test")]
                diff = ["", ""]
                if row not in ("text4vis",) and not row.startswith("ref-"):
                    sh, id_ = paired(rs, row, "text4vis", "test"), paired(rs, row, "text4vis", "test_id")
                    diff = [f"{sh[0]:+.1f} [{sh[1]:+.1f}, {sh[2]:+.1f}]", f"{id_[0]:+.1f} [{id_[1]:+.1f}, {id_[2]:+.1f}]"]
                    verdict[(world, regime, row)] = sh[0] >= 5 and sh[1] > 0 and id_[0] >= -1
                lines.append(f"| {row} | " + " | ".join(cells + diff) + f" | {len(r)} |")
    return "\n".join(lines), verdict


def main(argv=None) -> None:
    import tempfile

    from _common import command_line, machine, stamp, update_section

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=["tune", "report"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cmdcl-study")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--regimes", default=",".join(REGIMES),
                   help="report: the order in which the regimes run (all of them are reported)")
    p.add_argument("--recorded-only", action="store_true",
                   help="report: run nothing, write the tables of the runs recorded so far (a row missing "
                        "runs in a regime shows the runs it has)")
    a = p.parse_args(argv)
    order = a.regimes.split(",")
    if sorted(order) != sorted(REGIMES):
        p.error(f"--regimes must order all of {', '.join(REGIMES)}, got {a.regimes}")
    if a.epochs < 1 or a.workers < 1:
        p.error(f"--epochs and --workers must be >= 1, got {a.epochs} and {a.workers}")
    args = argparse.Namespace(frames=16, layers=1, epochs=a.epochs, batch_size=32, lr=1e-3, device="cpu", kp=32,
                              kz=64, workers=a.workers)
    if a.stage == "tune":
        results = run_stage("tune", tune_rows(), ["tune"], list(REGIMES), TUNE_DATA_SEEDS, TUNE_TRAIN_SEEDS, ["val"], args, a.work)
        selection = {regime: select(results, regime) for regime in REGIMES}
        SELECTION.write_text(json.dumps(selection, indent=1) + "\n")
        body = [f"Command: `PYTHONPATH=$PWD {command_line()}`; {machine()}; {stamp()}.", "",
                "| regime | mechanism | val top-1 % per grid value (mean of "
                f"{len(TUNE_DATA_SEEDS) * len(TUNE_TRAIN_SEEDS)} runs) | chosen |", "|---|---|---|---|"]
        for regime, sel in selection.items():
            for mech in GRID:
                body.append(f"| {regime} | {mech} | {sel[mech + '_val_means']} | {sel[mech]} |")
        update_section("study-tune", "\n".join(body))
        print("\n".join(body))
        return
    selection_by_regime = json.loads(SELECTION.read_text())
    all_results = []
    for regime in order:   # each regime runs with the settings chosen for it
        table = rows({m: selection_by_regime[regime][m] for m in GRID})
        all_results += [r for r in run_stage("report", table, list(WORLDS), [regime], REPORT_DATA_SEEDS,
                                             REPORT_TRAIN_SEEDS, ["val", "test_id", "test"], args, a.work,
                                             execute=not a.recorded_only)
                        if r["regime"] == regime]
    names = list(rows({m: 0 for m in GRID}))
    text, verdict = report_tables(all_results, names)
    met = [row for row in names if all(verdict.get((w, g, row)) for w in WORLDS for g in REGIMES)]
    body = [f"Command: `PYTHONPATH=$PWD {command_line()}`; {machine()}; {stamp()}.",
            f"Settings chosen on `tune` val: `{ {g: {m: s[m] for m in GRID} for g, s in selection_by_regime.items()} }`.",
            text, "", "Target (≥ +5 points shifted with the CI above 0 and ≥ −1 point in distribution, in every "
            f"world and both regimes) met by: {', '.join(met) or 'no row'}."]
    update_section("study-report", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
