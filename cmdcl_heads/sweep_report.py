"""`cmdcl-heads collect SWEEP`: a sweep's results over seeds, as the paper's figure 6 shows them.

Per point of the grid (the seeds pooled): the mean of the primary metric on each split with a 95 % t
interval, mean +- t(0.975, n-1) * sd / sqrt(n) (sd with n-1; no interval from one seed). Written as
results.md, results.csv and sweep.png: the metric against the first numeric swept option, one line per value
of the other options, the interval as a band (no numeric option: the first one's values as categories, the
interval as whiskers).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from .compare import run_result
from .sweep import finished_points, read_manifest

# t(0.975, df) for df = 1..30; beyond, the Cornish-Fisher expansion around z is good to 1e-4.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z975 = 1.959964


def t975(df: int) -> float:
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, half-width of the 95 % t interval); the half-width is None below two values."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    n, mean = len(values), sum(values) / len(values)
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t975(n - 1) * sd / math.sqrt(n)


def group(folder: Path) -> dict:
    """{"axes": swept option names (seed left out), "metric", "splits", "rows": [{labels, n, of, stats}]}."""
    manifest = read_manifest(folder)
    axes = [a["name"] for a in manifest["axes"] if a["name"] != "seed"]
    done = {entry["name"]: run_result(run) for entry, run in finished_points(folder)}
    groups: dict[tuple, dict] = {}
    for entry in manifest["points"]:
        key = tuple(entry["values"][a] for a in axes)
        g = groups.setdefault(key, {"labels": dict(zip(axes, key)), "of": 0, "results": []})
        g["of"] += 1
        if entry["name"] in done:
            g["results"].append(done[entry["name"]])
    results = list(done.values())
    metrics = {r["metric"] for r in results}
    splits = list(dict.fromkeys(s for r in results for s in r["splits"]))
    rows = []
    for g in groups.values():
        stats = {s: (*mean_ci(vals := [r["splits"].get(s) for r in g["results"]]), counted(vals)) for s in splits}
        rows.append({"labels": g["labels"], "n": len(g["results"]), "of": g["of"], "stats": stats})
    return {"axes": axes, "metric": "/".join(sorted(metrics)) or "metric", "splits": splits, "rows": rows}


def counted(values: list) -> int:
    """How many seeds a split's mean is over: a null or NaN metric is left out of it (and so of this count)."""
    return sum(v is not None and not math.isnan(v) for v in values)


def fmt(mean, half, n=None, seeds=None) -> str:
    """The cell; `(n=K)` marks a cell whose mean is over fewer seeds than the row's count."""
    if mean is None:
        return "-"
    text = f"{mean:.4f}" if half is None else f"{mean:.4f} ± {half:.4f}"
    return text + (f" (n={n})" if n is not None and seeds is not None and n < seeds else "")


def markdown(table: dict) -> str:
    cols = table["axes"] + ["seeds"] + [f"{s} {table['metric']}" for s in table["splits"]]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table["rows"]:
        cells = [r["labels"][a] for a in table["axes"]] + [f"{r['n']}/{r['of']}"]
        cells += [fmt(*r["stats"][s], r["n"]) for s in table["splits"]]
        lines.append("| " + " | ".join(cells) + " |")
    return (f"Mean ± 95 % t-interval over seeds of {table['metric']} per split.\n\n" + "\n".join(lines) + "\n")


def csv_text(table: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(table["axes"] + ["seeds", "of"] + [f"{s}_{table['metric']}_{x}" for s in table["splits"]
                                                       for x in ("mean", "ci95", "n")])
    for r in table["rows"]:
        stats = [("" if v is None else repr(v)) for s in table["splits"] for v in r["stats"][s]]
        writer.writerow([r["labels"][a] for a in table["axes"]] + [r["n"], r["of"]] + stats)
    return out.getvalue()


def _number(label: str) -> float | None:
    try:
        return float(label)
    except ValueError:
        return None


def categories_sorted(labels: list[str]) -> list[str]:
    return sorted(set(labels), key=_number)


def plot(table: dict, path: Path) -> bool:
    """Figure 6's form: one panel per split, metric vs the x option, one line per other setting, CI band."""
    if not table["splits"]:
        return False
    from .report import pyplot, save_png

    plt = pyplot()

    axes = table["axes"]
    numeric = [a for a in axes if all(_number(r["labels"][a]) is not None for r in table["rows"])]
    x_axis = (numeric or axes or [None])[0]
    others = [a for a in axes if a != x_axis]
    categories = list(dict.fromkeys(r["labels"][x_axis] for r in table["rows"])) if x_axis else ["all"]
    fig, panels = plt.subplots(1, len(table["splits"]), figsize=(5 * len(table["splits"]), 3.6), squeeze=False)
    for panel, split in zip(panels[0], table["splits"]):
        lines: dict[str, list] = {}
        for r in table["rows"]:
            name = ", ".join(f"{a}={r['labels'][a]}" for a in others) or table["metric"]
            label = r["labels"][x_axis] if x_axis else "all"
            x = _number(label) if x_axis in numeric else categories.index(label)
            lines.setdefault(name, []).append((x, *r["stats"][split]))
        for name, pts in lines.items():
            pts = sorted(p for p in pts if p[1] is not None)
            xs, ms = [p[0] for p in pts], [p[1] for p in pts]
            halves = [p[2] or 0.0 for p in pts]
            if x_axis not in numeric:   # categories (ablation variants): no line between them, whiskers
                panel.errorbar(xs, ms, yerr=halves, fmt="o", capsize=4, label=name)
                continue
            line, = panel.plot(xs, ms, marker="o", label=name)
            panel.fill_between(xs, [m - h for m, h in zip(ms, halves)], [m + h for m, h in zip(ms, halves)],
                               color=line.get_color(), alpha=0.2, linewidth=0)
        if x_axis in numeric:   # the swept values themselves, as figure 6 marks them
            panel.set_xticks(sorted({_number(c) for c in categories}), categories_sorted(categories))
        else:
            panel.set_xticks(range(len(categories)), categories, rotation=20)
        panel.set_xlabel(x_axis or "")
        panel.set_ylabel(f"{split} {table['metric']}")
        panel.grid(alpha=0.3)
        panel.legend(fontsize=8)
    fig.suptitle("mean ± 95 % CI over seeds", fontsize=10)
    save_png(fig, path)
    return True


def collect(folder: str | Path) -> dict:
    """Write results.md, results.csv and sweep.png into the sweep folder; returns the table and the paths."""
    from cmdcl_cache import write_atomic

    folder = Path(folder)
    table = group(folder)
    paths = {"md": folder / "results.md", "csv": folder / "results.csv", "png": folder / "sweep.png"}
    write_atomic(paths["md"], markdown(table).encode())
    write_atomic(paths["csv"], csv_text(table).encode())
    if not plot(table, paths["png"]):
        paths.pop("png")
    return {"table": table, "paths": paths}


def rich_table(table: dict, title: str):
    from rich.table import Table

    out = Table(title=title, caption="mean ± 95 % t-interval over the seeds finished")
    for col in table["axes"] + ["seeds"]:
        out.add_column(col)
    for split in table["splits"]:
        out.add_column(f"{split} {table['metric']}", justify="right")
    for r in table["rows"]:
        out.add_row(*[r["labels"][a] for a in table["axes"]], f"{r['n']}/{r['of']}",
                    *(fmt(*r["stats"][s], r["n"]) for s in table["splits"]))
    return out
