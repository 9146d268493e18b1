"""`cmdcl-heads report RUN [RUN ...] --out FILE.html`: one self-contained page about one or more runs.

Everything is read through the run folder contract (cmdcl_heads/run.py): the options and the cache's
provenance from the best checkpoint's metadata, the metrics from summary.json and metrics.jsonl, the curves
and the confusion matrix (or per-class AP) as the PNGs `train` wrote. The worst errors, the eval split's most
confident wrong top-1 predictions, need the run's cache: where it cannot be opened the page says why. For a
CMDCL run each error shown gets its `explain` picture.

The page needs nothing else: images are base64 data URIs, the style sheet is inline, there is no script,
and a Content-Security-Policy forbids every request (a browser refuses one and reports it). Every text
taken from data (video ids, label names, options, paths) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cmdcl_cache import CacheError, write_atomic

from .compare import NEVER_COMPARED, values_differ
from .run import CheckpointError, PLOTS, RunFolder

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
ERROR_TOP = 3   # predicted labels shown per error
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class ErrorRow:
    """One confident mistake: the video, its true labels, the labels predicted first, the truth's rank."""
    video_id: str
    truth: list[str]
    top: list[dict]                   # [{"name", "score"}], best first
    truth_rank: int | None            # 1-based rank of the best-ranked true label among all classes
    explanation: bytes | None = None  # explain's PNG (CMDCL runs)
    note: str = ""                    # why there is no explanation


@dataclass
class RunView:
    """What the page shows of one run folder."""
    name: str
    path: Path
    meta: dict
    summary: dict | None
    history: list[dict]
    plots: dict[str, bytes]
    errors: list[ErrorRow] = field(default_factory=list)
    errors_note: str = ""
    notes: list[str] = field(default_factory=list)   # what was read around (a cut line, a plot not shown)


# ------------------------------------------------------------------------------------------------ reading

def read_run(path: str | Path, errors: int = 8, explain: bool = True, device: str = "cpu") -> RunView:
    """A run folder's view; `errors` worst errors (0: the cache is not read)."""
    folder = RunFolder(path)
    meta = folder.load_checkpoint("best").meta   # refuses a folder that holds no run, naming it
    check_meta(folder, meta)
    view = RunView(name=folder.path.name, path=folder.path, meta=meta, summary=folder.read_summary(),
                   history=folder.read_metrics(), plots={})
    view.plots, view.notes = read_plots(folder)
    view.notes += [folder.metrics_note] if folder.metrics_note else []
    if errors and view.summary is None:
        view.errors_note = "the run has not finished (no summary.json): no eval split to read errors from"
    elif errors:
        view.errors, view.errors_note = read_errors(folder.path, view.summary["split"], errors,
                                                    explain and meta["head_config"]["model"] == "cmdcl", device)
    return view


PAGE_META = {"head_config": dict, "train_config": dict, "dataset": str, "label_set": str}


def check_meta(folder: RunFolder, meta: dict) -> None:
    """The checkpoint metadata the page reads: refused, naming the file and the keys, where it lacks them."""

    wrong = [k for k, kind in PAGE_META.items() if not isinstance(meta.get(k), kind)]
    if not wrong and not isinstance(meta["head_config"].get("model"), str):
        wrong = ["head_config.model"]
    if wrong:
        raise CheckpointError(f"{folder.checkpoint_path('best')}: its metadata lacks {', '.join(map(repr, wrong))} "
                              "(not what `train` writes)")


def read_plots(folder: RunFolder) -> tuple[dict[str, bytes], list[str]]:
    """(the run's PNGs, notes on those not shown): only regular files inside the run folder (no link out of
    it) that start with the PNG signature are inlined."""
    plots, notes = {}, []
    for name in PLOTS:
        path = folder.plot(name)
        if path is None:
            continue
        if not path.resolve().is_relative_to(folder.path.resolve()):
            notes.append(f"{path}: a link out of the run folder; not shown")
            continue
        with open(path, "rb") as fh:
            head = fh.read(len(PNG_SIGNATURE))
        if head != PNG_SIGNATURE:
            notes.append(f"{path}: not a PNG; not shown")
            continue
        plots[name] = path.read_bytes()
    return plots, notes


def wrong_by_confidence(predicted: np.ndarray, confidence: np.ndarray, targets: np.ndarray,
                        multi_label: bool) -> np.ndarray:
    """The rows whose top-1 label is wrong (not the target; multi-label: not one of the positives), the
    highest confidence in that label first."""
    rows = np.arange(len(predicted))
    hit = targets[rows, predicted] > 0 if multi_label else predicted == targets
    wrong = rows[~hit]
    return wrong[np.argsort(-confidence[wrong], kind="stable")]


def read_errors(run: Path, split: str, n: int, explain: bool, device: str) -> tuple[list[ErrorRow], str]:
    """(the n worst errors of `split`, a note): predicted again with best, on the run's cache."""
    import torch


    from .evaluate import open_run, top_labels, truth_keys

    try:
        r = open_run(run, "best", device=device)
        videos, feats = r.features(split)
        logits = torch.from_numpy(r.logits(feats))
    except (CacheError, OSError, ValueError, KeyError, RuntimeError) as err:
        return [], f"the run's cache could not be read, so no errors are shown ({type(err).__name__}: {err})"
    labels = r.data.labels
    first = top_labels(logits, labels, 1)
    wrong = wrong_by_confidence(np.array([t[0]["id"] for t in first]), np.array([t[0]["score"] for t in first]),
                                np.asarray(videos.targets), labels.multi_label)
    worst = wrong[:n]
    name_of = dict(zip(labels.keys, labels.names))
    rows = []
    for i, ranking in zip(worst, top_labels(logits[worst], labels, len(labels.keys)) if len(worst) else []):
        truth = truth_keys(videos.targets[i], labels)
        truth = [truth] if isinstance(truth, str) else truth
        ranks = [t["rank"] for t in ranking if t["key"] in truth]
        rows.append(ErrorRow(videos.video_ids[i], [name_of[k] for k in truth],
                             [{"name": t["name"], "score": t["score"]} for t in ranking[:ERROR_TOP]],
                             min(ranks) if ranks else None))
    if explain:
        for row in rows:
            row.explanation, row.note = explanation_png(run, row.video_id, device)
    return rows, (f"the {len(rows)} most confident of the {len(wrong)} wrong top-1 predictions on the "
                  f"{len(videos.video_ids)} {split} videos (best checkpoint)")


def explanation_png(run: Path, video_id: str, device: str) -> tuple[bytes | None, str]:
    """`explain`'s picture of one video as PNG bytes, or (None, why not)."""
    from .explain import explain_run

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = explain_run(run, video_id, Path(tmp) / "explain.png", device=device)
        except (ValueError, RuntimeError, OSError, KeyError) as err:
            return None, f"no explanation ({type(err).__name__}: {err})"
        return Path(path).read_bytes(), ""


# ------------------------------------------------------------------------------------------------ the page

def write_report(runs: list[str | Path], out: str | Path, errors: int = 8, explain: bool = True,
                 device: str = "cpu") -> Path:
    """Read every run, then write the page (atomically) to `out`; returns its path."""
    views = [read_run(r, errors, explain, device) for r in runs]
    names = [v.name for v in views]
    for v in views:   # two folders of one name (runs/a/x, runs/b/x): their paths tell them apart
        if names.count(v.name) > 1:
            v.name = str(v.path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, render(views))
    return out


def render(views: list[RunView]) -> str:
    title = "cmdcl report: " + ", ".join(v.name for v in views)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    columns = "".join(run_column(v) for v in views)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n"
            f"<title>{esc(title)}</title>\n<style>{STYLE}</style></head>\n<body>\n"
            f"<h1>{esc(title)}</h1>\n<p class=\"note\">Written {when} by <code>cmdcl-heads report</code>. "
            f"{'Highlighted rows: options that differ between the runs.' if len(views) > 1 else ''}</p>\n"
            f"{comparison_table(views)}\n"
            f"<div class=\"runs\" style=\"grid-template-columns: repeat({len(views)}, minmax(0, 1fr))\">"
            f"{columns}</div>\n</body></html>\n")


def comparison_table(views: list[RunView]) -> str:
    """One column per run: the results and the options and provenance attributes that differ (marked); every
    option and attribute in a folded table below it."""
    head = "<tr><th></th>" + "".join(f"<th>{esc(v.name)}</th>" for v in views) + "</tr>"
    sections = [("options (best checkpoint)", option_rows(views, "options")),
                ("cache provenance", option_rows(views, "provenance"))]
    top = [table_rows("result", result_rows(views), len(views), mark=False)]
    top += [table_rows(f"{name}: where the runs differ", [r for r in rows if differs(r)], len(views))
            for name, rows in sections if len(views) > 1 and any(differs(r) for r in rows)]
    every = [table_rows(name, rows, len(views)) for name, rows in sections]
    same = sum(not differs(r) for _, rows in sections for r in rows)
    summary = ("every option and the cache's provenance" if len(views) == 1
               else f"every option and the cache's provenance ({same} the same in every run)")
    return (f"<table class=\"compare\"><thead>{head}</thead><tbody>{''.join(top)}</tbody></table>\n"
            f"<details><summary>{esc(summary)}</summary>"
            f"<table class=\"compare\"><thead>{head}</thead><tbody>{''.join(every)}</tbody></table></details>")


def differs(row: tuple[str, list]) -> bool:
    key, values = row
    return key not in NEVER_COMPARED and values_differ(values)


def table_rows(section: str, rows: list[tuple[str, list]], runs: int, mark: bool = True) -> str:
    out = [f"<tr class=\"section\"><th colspan=\"{runs + 1}\">{esc(section)}</th></tr>"]
    for key, values in rows:
        row = '<tr class="differs">' if mark and runs > 1 and differs((key, values)) else "<tr>"
        out.append(f"{row}<th>{esc(key)}</th>" + "".join(f"<td>{esc(fmt(x))}</td>" for x in values) + "</tr>")
    return "".join(out)


def result_rows(views: list[RunView]) -> list[tuple[str, list]]:
    def pick(view, *keys):
        value = view.summary
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        return value

    rows = [("run folder", [str(v.path) for v in views]), ("model", [v.meta["head_config"]["model"] for v in views]),
            ("dataset / label set", [f"{v.meta['dataset']} / {v.meta['label_set']}" for v in views]),
            ("eval split", [pick(v, "split") for v in views]), ("best epoch", [pick(v, "best_epoch") for v in views]),
            ("selected on", [pick(v, "selection", "split") or "last epoch" if v.summary else None for v in views])]
    splits = list(dict.fromkeys(pick(v, "split") for v in views if v.summary))
    for split in splits:
        keys = list(dict.fromkeys(k for v in views if pick(v, "split") == split for k in v.summary["metrics"]))
        rows += [(f"{split} {k}", [pick(v, "metrics", k) if pick(v, "split") == split else None for v in views])
                 for k in keys]
    rows.append(("mean epoch seconds", [pick(v, "mean_epoch_seconds") for v in views]))
    return rows


def option_rows(views: list[RunView], kind: str) -> list[tuple[str, list]]:
    """Every option (train, then head) or provenance attribute of any run, in the first run's order."""
    if kind == "options":
        dicts = [{**v.meta["train_config"], **v.meta["head_config"]} for v in views]
    else:
        dicts = [{"cache folder": v.meta.get("cache_dir"), **(v.meta.get("cache_provenance") or {})} for v in views]
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    return [(k, [d.get(k) for d in dicts]) for k in keys]


def run_column(v: RunView) -> str:
    parts = [f"<section class=\"run\"><h2>{esc(v.name)}</h2>",
             f"<p class=\"note\">repeat: <code>cmdcl-heads train --config {esc(str(v.path / 'config.toml'))} "
             "--out OTHER</code></p>", *(f"<p class=\"note\">{esc(n)}</p>" for n in v.notes), split_metrics(v)]
    for name, caption in (("curves.png", "training curves"), ("confusion.png", "confusion matrix"),
                          ("per_class_ap.png", "per-class average precision"), ("probe.png", "linear probe's l2")):
        if name in v.plots:
            parts.append(f"<figure>{img(v.plots[name], f'{caption} of {v.name}')}<figcaption>{esc(caption)} "
                         f"({esc(name)})</figcaption></figure>")
    if "curves.png" not in v.plots:
        parts.append("<p class=\"note\">no training curves: nothing was trained epoch by epoch</p>")
    parts.append(errors_section(v))
    return "".join(parts) + "</section>"


def split_metrics(v: RunView) -> str:
    """The metrics of best on each split the run evaluated it on (eval, selection)."""
    if v.summary is None:
        last = v.history[-1] if v.history else {}
        return (f"<p class=\"note\">not finished (no summary.json); {len(v.history)} epoch(s) logged"
                f"{', last train loss ' + esc(fmt(last.get('train_loss'))) if last else ''}</p>")
    rows = {f"{v.summary['split']} (eval, best)": v.summary["metrics"]}
    selection = v.summary.get("selection") or {}
    if selection.get("metrics"):
        rows[f"{selection['split']} (selection, best)"] = selection["metrics"]
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    head = "<tr><th>split</th>" + "".join(f"<th>{esc(k)}</th>" for k in keys) + "</tr>"
    body = "".join(f"<tr><th>{esc(name)}</th>" + "".join(f"<td>{esc(fmt(r.get(k)))}</td>" for k in keys) + "</tr>"
                   for name, r in rows.items())
    return f"<h3>metrics per split</h3><table>{head}{body}</table>"


def errors_section(v: RunView) -> str:
    out = [f"<h3>worst errors</h3><p class=\"note\">{esc(v.errors_note)}</p>"]
    if v.errors:
        out.append("<table class=\"errors\"><tr><th>video</th><th>truth</th><th>predicted (score)</th>"
                   "<th>truth's rank</th></tr>")
        for e in v.errors:
            top = "<br>".join(f"<bdi>{esc(t['name'])}</bdi> ({t['score']:.3f})" for t in e.top)
            out.append(f"<tr><td><code>{esc(e.video_id)}</code></td><td><bdi>{esc(', '.join(e.truth))}</bdi></td>"
                       f"<td>{top}</td><td>{esc(fmt(e.truth_rank))}</td></tr>")
        out.append("</table>")
    for e in v.errors:
        if e.explanation:
            out.append(f"<figure>{img(e.explanation, f'explanation of {e.video_id}')}<figcaption>explain: "
                       f"<code>{esc(e.video_id)}</code></figcaption></figure>")
        elif e.note:
            out.append(f"<p class=\"note\"><code>{esc(e.video_id)}</code>: {esc(e.note)}</p>")
    return "".join(out)


# ------------------------------------------------------------------------------------------------ pieces

BIDI_CONTROLS = dict.fromkeys([*range(0x202A, 0x202F), *range(0x2066, 0x206A)])   # embeddings, overrides, isolates


def esc(text) -> str:
    """Escaped for HTML, without the bidi controls that would reorder the cells after them (a label name
    with U+202E would show a score backwards); each cell's own direction comes from its text."""
    return html.escape(str(text).translate(BIDI_CONTROLS), quote=True)


def img(png: bytes, alt: str) -> str:
    return f"<img alt=\"{esc(alt)}\" src=\"data:image/png;base64,{base64.b64encode(png).decode('ascii')}\">"


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return str(value)


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.4em; } h2 { font-size: 1.2em; margin-top: 0; } h3 { font-size: 1em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
table.compare td, table.compare th { max-width: 28em; overflow-wrap: anywhere; }
tr.section th { background: #e8eef7; }
tr.differs td, tr.differs th { background: #fff3bf; }
.note { color: #555; font-size: 0.9em; }
.runs { display: grid; gap: 1.5em; margin-top: 1.5em; }
.run { border-top: 3px solid #4a78b5; padding-top: 0.5em; min-width: 0; }
.run > * { min-width: 0; max-width: 100%; }
.run table { display: block; overflow-x: auto; max-width: 100%; }   /* five runs: a table scrolls, not the page */
img { max-width: 100%; height: auto; }
figure { margin: 0.5em 0; }
code { overflow-wrap: anywhere; }
summary { cursor: pointer; margin: 0.5em 0; font-weight: 600; }
"""
