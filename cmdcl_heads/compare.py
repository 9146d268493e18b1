"""`cmdcl-heads compare RUN|SWEEP ...`: one table of runs: the options that differ between them (only those),
the primary metric per split, the selected epoch and the time. Runs are read only through the run folder
contract (cmdcl_heads/run.py: config.toml, summary.json, metrics.jsonl); a sweep folder stands for its
finished points.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from .run import RunFolder
from .sweep import SWEEP_FILE, finished_points

FORMATS = ("table", "md", "csv", "json")
NEVER_COMPARED = {"out", "quiet", "resume"}   # where a run was written and how it ran: never its result


def values_differ(values: list) -> bool:
    """The one rule of `compare` and the report page: the values are not all the same (as JSON)."""
    return len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1


def run_result(run: RunFolder) -> dict:
    """{metric, splits: {split: primary metric}, best_epoch, seconds} of a run; unfinished: finished False.
    The selection split (val) comes first, then the eval split of summary.json."""
    summary = run.read_summary()
    if summary is None:
        return {"finished": False, "metric": None, "splits": {}, "best_epoch": None, "seconds": None}
    metric = summary["primary_metric"]
    splits = {}
    selection = summary.get("selection") or {}
    if selection.get("split") and selection.get("metrics"):
        splits[selection["split"]] = selection["metrics"].get(metric)
    splits[summary["split"]] = summary["metrics"].get(metric)
    records = run.read_metrics()
    seconds = sum((r.get("epoch_seconds") or 0) + (r.get("eval_seconds") or 0) for r in records)
    return {"finished": True, "metric": metric, "splits": splits, "best_epoch": summary.get("best_epoch"),
            "seconds": seconds if records else None}


def expand(paths: list[Path]) -> list[RunFolder]:
    """Run folders named, and the finished points of sweep folders named, in the order given."""
    runs = []
    for path in paths:
        if (Path(path) / SWEEP_FILE).is_file():
            points = [run for _, run in finished_points(path)]
            if not points:   # dropping it quietly would read as a table of everything named
                raise ValueError(f"{path}: a sweep folder with no finished point yet (nothing of it to compare)")
            runs += points
        else:
            runs.append(RunFolder(path))
    return runs


def options_of(run: RunFolder) -> dict:
    config = run.read_config()
    return {**config["head"], **config["train"]}


def differing(options: list[dict]) -> list[str]:
    """Option names whose value is not the same in every run, in file order. config.toml leaves unset
    (None) options out, so a missing key reads as None."""
    names = list(dict.fromkeys(k for o in options for k in o))
    return [k for k in names if k not in NEVER_COMPARED and values_differ([o.get(k) for o in options])]


def comparison(paths: list[Path]) -> dict:
    """{"columns": [...], "rows": [{column: value}]}: run, the differing options, metric per split, best
    epoch, seconds."""
    runs = expand(paths)
    if not runs:
        raise ValueError("nothing to compare: the sweep folders named hold no finished point")
    options = [options_of(r) for r in runs]
    results = [run_result(r) for r in runs]
    keys = differing(options)
    metric_cols = list(dict.fromkeys(f"{split} {res['metric']}" for res in results for split in res["splits"]))
    rows = []
    for run, opts, res in zip(runs, options, results):
        row = {"run": str(run.path), **{k: opts.get(k) for k in keys}}
        row.update({f"{split} {res['metric']}": value for split, value in res["splits"].items()})
        row.update({"best epoch": res["best_epoch"] if res["finished"] else "unfinished", "seconds": res["seconds"]})
        rows.append(row)
    return {"columns": ["run", *keys, *metric_cols, "best epoch", "seconds"], "rows": rows}


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def render(table: dict, fmt: str) -> str | object:
    """The comparison as text (md, csv, json) or as a rich Table (table)."""
    columns, rows = table["columns"], table["rows"]
    if fmt == "json":
        finite = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                  for r in rows]   # NaN and inf are no JSON: null, as for a metric a run did not report
        return json.dumps(finite, indent=2, allow_nan=False) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows([{c: ("" if r.get(c) is None else r.get(c)) for c in columns} for r in rows])
        return out.getvalue()
    if fmt == "md":
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
        return "\n".join(lines) + "\n"
    from rich.table import Table

    rich_table = Table(title="runs compared (options: only those that differ)")
    for c in columns:
        rich_table.add_column(c, justify="left" if c == "run" else "right")
    for r in rows:
        rich_table.add_row(*(cell(r.get(c)) for c in columns))
    return rich_table
