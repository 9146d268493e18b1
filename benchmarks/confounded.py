"""Controlled-confounder benchmark: in-distribution and shifted top-1 of every head, in one table.

    PYTHONPATH=$PWD python benchmarks/confounded.py            # defaults: ~minutes on a 2-core CPU
    PYTHONPATH=$PWD python benchmarks/confounded.py --seeds 5 --epochs 30 --dim 128 --train-per-class 100

It writes a cache in the project's format (`write_synthetic_cache`, `texts.h5`) and a manifest folder in the
format of cmdcl_cache/manifest/format.py (label sets `activity`, single-label and default, and `action`, multi-label and
fine; splits train, val and test_id in distribution (val picks the checkpoint), test shifted), builds the confounder dictionaries on it,
trains zero-shot, linear, text4vis, cmdcl, cmdcl --no-tci and cmdcl --no-vci, and prints one table.
`--rows` also offers CMDCL variants (*ours*, VARIANT_ROWS, not run by default; BENCHMARKS.md "CMDCL
variants"): class-mean V_P of the fine set, --mediator-mode replace|project, --cross-sample-mode backdoor.

The structural causal model
---------------------------

Variables (one draw per video v; all directions are fixed unit vectors in R^D drawn once from the data
seed, so random directions are nearly orthogonal for D >= 64):

    Y  activity, uniform over C activities                                        (the label)
    S  its script: an ordered sequence of L atomic actions out of A shared ones. Activities share
       actions; `order_pairs` pairs of activities use the SAME L actions in a different order, so only
       temporal order tells them apart (a mean-pooled feature cannot).
    G  segment boundaries: L contiguous segments of random length (>= 2 frames each) over T frames
    U  per-video appearance of each action: a_k(v) = a_k + tau * u_vk, u_vk ~ N(0, I/D)
       (the same action looks a little different in every video; the background does not)
    B  background (scene), one of C scenes, each activity having a "home" scene h(Y):
           B = h(Y) with probability rho, else uniform over the scenes  (train, val, test_id)
           B uniform over the scenes, independent of Y                       (test: the shifted split)
       (C scenes by default; `scenes` > C adds scenes that are no activity's home; `scene_switch` moves a
       step to another random scene with that probability; `scene_in_span` sets how much of each scene
       direction lies inside the action-text span)
    X_t frame feature t:  alpha * a_{S[g(t)]}(v) + beta * b_{B(t)} + sigma * eps_t,  eps_t ~ N(0, I/D)
       (||eps_t|| ~ 1, so alpha, beta and sigma are norms of the action, scene and noise parts)

Texts (what a CLIP text tower would give; several prompts each, ensembled CLIP-style):
    activity c:  mean_k a_k over its actions + gamma * b_{h(c)} + eta * n_c + prompt noise
                 the label text is biased toward its activity's *training* scene ("making cereal" reads
                 like "a kitchen"): the cross-modal bias B -> T of the paper's causal graph;
                 n_c is a label-specific direction that no frame carries (what a name says beyond
                 what is seen). Order pairs share their action mean, so their texts differ only through
                 the scene and name terms.
    action k:    a_k + prompt noise (fine-grained texts sit near what the frames show)

Reference caches drawn with the SAME noise, segments and labels:
    nobg:   X_t = alpha * a(v) + sigma * eps_t          background removed: what a perfectly deconfounded
                                                       model could reach
    bgonly: X_t = beta * b_B + sigma * eps_t            the shortcut alone: chance on the shifted split

Defaults: D=64, C=8, A=12, L=4, T=32 cached frames, 2 order pairs, 40 train / 40 val / 40 test_id / 40 test videos
per activity (1280 in all), rho=0.9, alpha=1, beta=1.5, sigma=1.0, tau=0.5, gamma=0.5, eta=0.3.

Calibration (only so that the two reference rows bound the table; no model row was used to choose a value)
------------------------------------------------------------------------------------------------------
- Fixed a priori, never tuned: rho=0.9 (the brief's strong but imperfect correlation: training still holds
  counter-examples), beta=1.5 > alpha=1 (a scene dominates a CLIP frame embedding more than the hands'
  action does, so the shortcut is the easiest feature in training), tau=0.5, gamma=0.5, eta=0.3, prompts.
- The scene-alone reference is at chance on the shifted split by construction (B is independent of Y
  there); measured 12.5 %.
- Tuned: the frame noise sigma (and the epoch budget, the same for every head). With sigma=1.5 and 15
  epochs the background-removed reference reached only 79 % on the shifted split; reference rows alone at
  sigma 1.5 / 1.0 / 0.75 gave 79 / 86 / 89.5 % (15 epochs). sigma=1.0 with 20 epochs gives ~91 %: the
  noisiest setting that keeps the deconfounded bound near 90 %, far above the confounded heads.
- What still caps the deconfounded reference below 100 %: the order pairs (their texts differ only through
  the scene and name terms, so the frozen text4vis classifier must map temporal order onto those
  directions) and the per-video action variation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from cmdcl_cache.manifest.io import make_labels_json, write_manifest
from cmdcl_cache.ingest.synthetic import write_synthetic_cache
from cmdcl_cache.cache.format import TextEmbeddings

ACTION_WORDS = ["take", "pour", "cut", "stir", "crack", "fry", "spread", "butter", "add", "put", "peel",
                "squeeze", "open", "close", "wash", "dry", "fold", "press", "shake", "scoop", "whisk", "mix",
                "slice", "serve"]


@dataclass
class SCMConfig:
    dim: int = 64             # D
    activities: int = 8       # C (also the number of scenes)
    actions: int = 12         # A shared atomic actions
    steps: int = 4            # L actions per activity
    order_pairs: int = 2      # pairs of activities with the same actions in another order
    frames: int = 32          # T cached frames per video
    train_per_class: int = 40
    test_per_class: int = 40  # per split: val and test_id (in distribution) and test (shifted)
    rho: float = 0.9          # P(scene = home scene of the activity) in train and test_id
    alpha: float = 1.0        # action part of a frame
    beta: float = 1.5         # scene part of a frame
    sigma: float = 1.0        # frame noise
    tau: float = 0.5          # per-video variation of an action's appearance
    gamma: float = 0.5        # scene bias of the activity texts
    eta: float = 0.3          # label-specific text direction (absent from frames)
    prompts: int = 4          # prompts per label
    prompt_noise: float = 0.1
    seed: int = 0             # data seed
    # study knobs (BENCHMARKS.md "Causal study"); their defaults draw exactly the data drawn before they existed
    scenes: int = 0           # number of scenes (0: one per activity); each activity has its own home scene
    scene_in_span: float = -1.0  # share of each scene direction's squared norm inside span(action texts);
                                 # < 0: random directions (about A/D of it inside); ignored when A >= D
    scene_switch: float = 0.0  # probability that a segment is shot in another (random) scene: scenes that move

    def to_dict(self) -> dict:
        return asdict(self)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _scene_directions(draw: np.ndarray, act_dir: np.ndarray, in_span: float) -> np.ndarray:
    """Unit scene directions from a Gaussian draw; in_span >= 0 sets the share of each one's squared norm that
    lies inside the span of the action directions (the same draw split into its two parts)."""
    if in_span < 0:
        return _unit(draw)
    q, sv, _ = np.linalg.svd(act_dir.T, full_matrices=False)
    q = q[:, sv > sv[0] * 1e-6]
    if q.shape[1] >= draw.shape[1]:   # the actions span the space: every direction lies inside
        return _unit(draw)
    inside = draw @ q @ q.T
    return _unit(np.sqrt(in_span) * _unit(inside) + np.sqrt(1 - in_span) * _unit(draw - inside))


def _scripts(cfg: SCMConfig, rng: np.random.Generator) -> list[list[int]]:
    """C ordered action scripts; the first 2*order_pairs come in pairs with equal sets, other orders."""
    if 2 * cfg.order_pairs > cfg.activities or cfg.steps > cfg.actions or cfg.frames < 2 * cfg.steps:
        raise ValueError("need 2*order_pairs <= activities, steps <= actions and frames >= 2*steps")
    scripts: list[list[int]] = []
    seen_sets = set()
    while len(scripts) < cfg.activities:
        s = [int(a) for a in rng.choice(cfg.actions, cfg.steps, replace=False)]
        if frozenset(s) in seen_sets:
            continue
        seen_sets.add(frozenset(s))
        scripts.append(s)
        if len(scripts) <= 2 * cfg.order_pairs and len(scripts) % 2 == 1:
            # its partner: same actions, a different order (a cyclic shift keeps it a real reordering)
            scripts.append(s[1:] + s[:1])
    return scripts


def generate(cfg: SCMConfig) -> dict:
    """Draw the whole benchmark. Returns arrays keyed by video and the texts (see module docstring)."""
    rng = np.random.default_rng(cfg.seed)
    d, c_n = cfg.dim, cfg.activities
    n_scenes = cfg.scenes or c_n
    if n_scenes < c_n:
        raise ValueError(f"scenes={cfg.scenes}: need at least one home scene per activity ({c_n})")
    act_dir = _unit(rng.standard_normal((cfg.actions, d)))
    scene_dir = _scene_directions(rng.standard_normal((n_scenes, d)), act_dir, cfg.scene_in_span)
    name_dir = _unit(rng.standard_normal((c_n, d)))
    scripts = _scripts(cfg, rng)
    home = rng.permutation(n_scenes)[:c_n]  # h(c): the training scene of activity c

    videos, feats, nobg, bgonly = [], {}, {}, {}
    # val picks the checkpoint (and, in the study, every setting); test_id reports in distribution. test_id is
    # drawn last so that the other splits are the data drawn before it existed.
    plan = [("train", cfg.train_per_class, True), ("val", cfg.test_per_class, True),
            ("test", cfg.test_per_class, False), ("test_id", cfg.test_per_class, True)]
    for split, per_class, confounded in plan:
        for c in range(c_n):
            for i in range(per_class):
                vid = f"{split}-{c:02d}-{i:04d}"
                scene = home[c] if (confounded and rng.random() < cfg.rho) else int(rng.integers(n_scenes))
                # segment lengths: 2 frames each + a Dirichlet share of the rest
                spare = cfg.frames - 2 * cfg.steps
                extra = np.floor(rng.dirichlet(np.full(cfg.steps, 2.0)) * spare).astype(int)
                extra[-1] += spare - extra.sum()
                cuts = np.concatenate([[0], np.cumsum(2 + extra)])
                seg = np.zeros(cfg.frames, dtype=int)
                for j in range(cfg.steps):
                    seg[cuts[j]:cuts[j + 1]] = j
                look = act_dir[scripts[c]] + cfg.tau * rng.standard_normal((cfg.steps, d)) / np.sqrt(d)
                action_part = cfg.alpha * look[seg]
                seg_scene = np.full(cfg.steps, scene)
                if cfg.scene_switch > 0:   # some steps happen elsewhere (drawn only then: defaults keep their data)
                    moved = rng.random(cfg.steps) < cfg.scene_switch
                    seg_scene[moved] = rng.integers(n_scenes, size=int(moved.sum()))
                scene_part = cfg.beta * scene_dir[seg_scene[seg]]
                noise = cfg.sigma * rng.standard_normal((cfg.frames, d)) / np.sqrt(d)
                feats[vid] = (action_part + scene_part + noise).astype(np.float32)
                nobg[vid] = (action_part + noise).astype(np.float32)
                bgonly[vid] = (scene_part + noise).astype(np.float32)
                segments = [{"label": f"a{scripts[c][j]:02d}", "set": "action",
                             "start": float(cuts[j]), "end": float(cuts[j + 1])} for j in range(cfg.steps)]
                videos.append({"video_id": vid, "path": f"synthetic/{vid}", "split": split,
                               "labels": {"activity": f"c{c:02d}",
                                          "action": sorted({f"a{k:02d}" for k in scripts[c]})},
                               "duration": float(cfg.frames), "segments": segments,
                               "meta": {"scene": int(scene), "home_scene": int(home[c]),
                                        "shifted": not confounded}})

    def texts(base: np.ndarray, names: list[str]) -> TextEmbeddings:
        noise = cfg.prompt_noise * rng.standard_normal((len(base), cfg.prompts, d)) / np.sqrt(d)
        per_prompt = (_unit(base)[:, None, :] + noise).astype(np.float32)
        return TextEmbeddings(names=names, texts=names, templates=[f"prompt {p}: {{}}" for p in range(cfg.prompts)],
                              per_prompt=per_prompt, ensemble=TextEmbeddings.ensemble_of(per_prompt))

    act_text = np.stack([act_dir[s].mean(0) for s in scripts]) + cfg.gamma * scene_dir[home] + cfg.eta * name_dir
    activity_names = [" then ".join(ACTION_WORDS[k % len(ACTION_WORDS)] for k in s) for s in scripts]
    action_names = [ACTION_WORDS[k % len(ACTION_WORDS)] for k in range(cfg.actions)]
    return {"videos": videos, "features": feats, "nobg": nobg, "bgonly": bgonly,
            "texts": {"activity": texts(act_text, activity_names), "action": texts(act_dir, action_names)},
            "scripts": scripts, "home": home, "activity_names": activity_names, "action_names": action_names}


def write_benchmark(root: str | Path, cfg: SCMConfig) -> dict[str, Path]:
    """Write the manifest folder and three caches (full, nobg, bgonly) under `root`; returns their paths."""
    root = Path(root)
    data = generate(cfg)
    labels = make_labels_json(
        "confounded",
        {"activity": (False, [(f"c{c:02d}", n) for c, n in enumerate(data["activity_names"])]),
         "action": (True, [(f"a{k:02d}", n) for k, n in enumerate(data["action_names"])])},
        default_label_set="activity", fine_label_set="action", split_schemes=["default"],
        split_roles={"test_id": "test"},
        source="benchmarks/scm.py (synthetic structural causal model) " + repr(cfg.to_dict()),
        licence="generated; no licence restrictions")
    write_manifest(root / "manifest", data["videos"], labels)
    out = {"manifest": root / "manifest"}
    for name in ("features", "nobg", "bgonly"):
        tag = {"features": "full"}.get(name, name)
        path = root / "cache" / "confounded" / tag
        write_synthetic_cache(path, data[name], data["texts"],
                              provenance={"dataset": "confounded", "model": f"scm-{tag}",
                                          "scm": cfg.to_dict()})
        out[tag] = path
    return out


# ------------------------------------------------------------------------------------------- training

# (key, label, cache variant, model, extra HeadConfig fields); reference rows use text4vis on the other caches.
ROWS = [
    ("ref-deconfounded", "reference: text4vis, scene removed", "nobg", "text4vis", {}),
    ("zeroshot", "zero-shot", "full", "zeroshot", {}),
    ("linear", "linear probe", "full", "linear", {}),
    ("text4vis", "text4vis", "full", "text4vis", {}),
    ("cmdcl", "cmdcl (figure-4 approximator, reads T')", "full", "cmdcl", {}),
    ("cmdcl-dictionary", "cmdcl --approximator dictionary (after CATT)", "full", "cmdcl",
     {"approximator": "dictionary"}),
    ("cmdcl-no-tci", "cmdcl --no-tci", "full", "cmdcl", {"tci": False}),
    ("cmdcl-no-vci", "cmdcl --no-vci", "full", "cmdcl", {"vci": False}),
    ("ref-shortcut", "reference: text4vis, scene alone", "bgonly", "text4vis", {}),
]
# CMDCL variants (*inferred/ours*, not the paper's; BENCHMARKS.md "CMDCL variants"), not run by default.
# Cache variant "full-cm": the full cache with V_P built from class-mean prototypes of the fine (action) set.
VARIANT_ROWS = [
    ("cmdcl-vp-classmean", "cmdcl, V_P class-mean (actions)", "full-cm", "cmdcl", {}),
    ("cmdcl-replace", "cmdcl --mediator-mode replace", "full", "cmdcl", {"mediator_mode": "replace"}),
    ("cmdcl-project", "cmdcl --mediator-mode project", "full", "cmdcl", {"mediator_mode": "project"}),
    ("cmdcl-project-classmean", "cmdcl project + V_P class-mean", "full-cm", "cmdcl", {"mediator_mode": "project"}),
    ("cmdcl-project-no-tci", "cmdcl project --no-tci", "full", "cmdcl", {"mediator_mode": "project", "tci": False}),
    ("cmdcl-project-only", "cmdcl project --no-tci --no-cross-sample", "full", "cmdcl",
     {"mediator_mode": "project", "tci": False, "cross_sample": False}),
    ("cmdcl-backdoor", "cmdcl --cross-sample-mode backdoor", "full", "cmdcl",
     {"cross_sample_mode": "backdoor", "approximator": "dictionary"}),
    ("cmdcl-project-backdoor", "cmdcl project + backdoor", "full", "cmdcl",
     {"mediator_mode": "project", "cross_sample_mode": "backdoor", "approximator": "dictionary"}),
]
ALL_ROWS = ROWS + VARIANT_ROWS
FEATURES = {"full": "action + scene", "full-cm": "action + scene", "nobg": "action only", "bgonly": "scene only"}


def train_eval(cache_dir: Path, manifest_dir: Path, run: Path, model: str, seed: int, args, extra: dict,
               splits=("val", "test_id", "test"), train_extra: dict | None = None) -> dict[str, float]:
    """Train one head in-process (cmdcl_heads.train.train) and return the top-1 of its best checkpoint on
    `splits`. The checkpoint is chosen on val (in distribution), never on what is reported."""
    from cmdcl_heads.config import HeadConfig, TrainConfig
    from cmdcl_heads.evaluate import evaluate_splits
    from cmdcl_heads.train import train

    head = HeadConfig(model=model, frames=args.frames, layers=args.layers, **extra)
    config = TrainConfig(cache=str(cache_dir), dataset=str(manifest_dir), out=str(run), eval_split="test_id",
                         select_split="val", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed,
                         device=args.device, data_mode="memory", workers=0, quiet=True, **(train_extra or {}))
    train(config, head)
    metrics = evaluate_splits(run, "best", list(splits), device=args.device, data_mode="memory", quiet=True)
    return {split: m["top1"] for split, m in metrics.items()}


def build_dictionaries(cache_dir: Path, manifest_dir: Path, args, prototypes: str = "kmeans") -> None:
    from cmdcl_cache.manifest.io import load_manifest
    from cmdcl_heads.confounders import FILE_NAME, build_confounders

    conf = build_confounders(cache_dir, load_manifest(manifest_dir), kp=args.kp, kz=args.kz, seed=0,
                             prototypes=prototypes, progress=False)
    conf.save(cache_dir / FILE_NAME)


def class_mean_copy(paths: dict[str, Path]) -> Path:
    """A copy of the full cache (same shards and texts, so the same fingerprint) under the tag full-cm,
    whose confounders.h5 will hold class-mean V_P of the fine set (the atomic actions, from their segments)."""
    import shutil

    from cmdcl_heads.confounders import FILE_NAME

    src, dst = paths["full"], paths["full"].parent / "full-cm"
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != FILE_NAME:
            shutil.copy2(f, dst / f.name)
    return dst


# ------------------------------------------------------------------------------------------------ report

def results_table(results: dict[str, dict[str, list[float]]], chance: float, text4vis_key: str = "text4vis"):
    from rich.table import Table

    from _common import fmt_pm, mean_std

    table = Table(title="Controlled-confounder benchmark: top-1 % (mean ± std over runs)")
    for col, justify in [("model", "left"), ("features", "left"), ("test_id (in-dist.)", "right"),
                         ("test (shifted)", "right"), ("drop", "right"), ("shifted vs text4vis", "right")]:
        table.add_column(col, justify=justify)
    base = mean_std(results[text4vis_key]["test"])[0] if text4vis_key in results else None
    rows = []
    for key, label, variant, _model, _extra in ALL_ROWS:
        if key not in results:
            continue
        r = results[key]
        drop = mean_std(r["test_id"])[0] - mean_std(r["test"])[0]
        delta = "" if base is None or key == text4vis_key else f"{(mean_std(r['test'])[0] - base) * 100:+.1f}"
        cells = [label, FEATURES[variant],
                 fmt_pm(r["test_id"]), fmt_pm(r["test"]), f"{drop * 100:.1f}", delta]
        rows.append(cells)
        table.add_row(*cells, end_section=key in ("ref-deconfounded", "cmdcl-no-vci"))
    return table, rows


def markdown(rows, chance: float) -> str:
    head = ["model", "features", "test_id (in-dist.) top-1 %", "test (shifted) top-1 %", "drop", "shifted vs text4vis"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append(f"\nChance: {chance * 100:.1f} %.")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- main

def block_heading(title: str) -> str:
    """The block's heading inside BENCHMARKS.md's page: its own title (`--title ', data seed varies'`
    reads "Data seed varies"), so that no two blocks of one page share a title."""
    text = title.strip().lstrip(",").strip() or "the heads, training seeds vary"
    return text[0].upper() + text[1:]


def parse_args(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = SCMConfig()
    g = p.add_argument_group("structural causal model")
    for name in ("dim", "activities", "actions", "steps", "order_pairs", "frames", "train_per_class",
                 "test_per_class", "rho", "alpha", "beta", "sigma", "tau", "gamma", "eta", "seed"):
        flag = "--cached-frames" if name == "frames" else "--data-seed" if name == "seed" else \
            "--" + name.replace("_", "-")
        g.add_argument(flag, dest="scm_" + name, type=type(getattr(d, name)), default=getattr(d, name))
    t = p.add_argument_group("training (the same for every head)")
    t.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1")
    t.add_argument("--data-seeds", type=int, default=1,
                   help="datasets drawn with data seeds S..S+K-1 (S = --data-seed); every training seed runs on each")
    t.add_argument("--frames", type=int, default=16, help="T frames sampled per video")
    t.add_argument("--layers", type=int, default=1, help="temporal transformer layers (text4vis and cmdcl)")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--kp", type=int, default=32, help="K_p of V_P")
    t.add_argument("--kz", type=int, default=64, help="K_z of Z")
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--rows", default=",".join(r[0] for r in ROWS),
                   help="comma-separated rows to run (default: the paper's heads and ablations; CMDCL variants, "
                        "*ours*: " + ", ".join(r[0] for r in VARIANT_ROWS) + ")")
    p.add_argument("--work", type=Path, default=None, help="folder for caches and runs (default: a temp dir)")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    p.add_argument("--section", default="confounded", help="BENCHMARKS.md section to write")
    p.add_argument("--title", default="", help="what tells this block apart, e.g. ', data seed varies' "
                                                "(default: the heads, training seeds vary)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    import shutil
    import sys
    import tempfile
    import time
    import warnings

    import torch
    from rich.console import Console

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import command_line, machine, stamp, update_section

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    console = Console(width=150)
    scm = SCMConfig(**{k[4:]: v for k, v in vars(args).items() if k.startswith("scm_")})
    unknown = set(args.rows.split(",")) - {r[0] for r in ALL_ROWS}
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {', '.join(sorted(unknown))}; have {', '.join(r[0] for r in ALL_ROWS)}")
    wanted = [r for r in ALL_ROWS if r[0] in set(args.rows.split(","))]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cmdcl-confounded-"))
    t_start = time.perf_counter()
    data_seeds = [scm.seed + i for i in range(args.data_seeds)]
    datasets, t_data, t_conf = {}, 0.0, 0.0
    for ds in data_seeds:
        t0 = time.perf_counter()
        datasets[ds] = write_benchmark(work / f"data{ds}", replace(scm, seed=ds))
        t1 = time.perf_counter()
        for variant in sorted({v for _, _, v, m, _ in wanted if m == "cmdcl"}):
            if variant == "full-cm":
                datasets[ds]["full-cm"] = class_mean_copy(datasets[ds])
            build_dictionaries(datasets[ds][variant], datasets[ds]["manifest"], args,
                               prototypes="class-mean" if variant == "full-cm" else "kmeans")
        t_data, t_conf = t_data + t1 - t0, t_conf + time.perf_counter() - t1
    console.print(f"data: {work} ({t_data:.1f} s), confounders {t_conf:.1f} s; {machine()}")

    results: dict[str, dict[str, list[float]]] = {}
    timings: dict[str, float] = {}
    for key, label, variant, model, extra in wanted:
        seeds = [0] if model == "zeroshot" else list(range(args.seeds))  # zero-shot has nothing to train
        t0 = time.perf_counter()
        for ds in data_seeds:
            paths = datasets[ds]
            for seed in seeds:
                run = work / "runs" / f"{key}-d{ds}-s{seed}"
                acc = train_eval(paths[variant], paths["manifest"], run, model, seed, args, extra)
                for split in ("test_id", "test"):
                    results.setdefault(key, {"test_id": [], "test": []})[split].append(acc[split])
        timings[key] = time.perf_counter() - t0
        r = results[key]
        console.print(f"  {label:36s} id {100 * sum(r['test_id']) / len(r['test_id']):5.1f}  "
                      f"shifted {100 * sum(r['test']) / len(r['test']):5.1f}  ({timings[key]:.1f} s)")
    total = time.perf_counter() - t_start
    chance = 1.0 / scm.activities
    table, rows = results_table(results, chance)
    console.print(table)
    seeds_text = (f"training seeds 0..{args.seeds - 1} (zero-shot: deterministic) x data seeds "
                  f"{', '.join(map(str, data_seeds))}" + (" (fixed)" if len(data_seeds) == 1 else "")
                  + f"; mean ± std over {len(data_seeds) * args.seeds} runs per trained row")
    console.print(f"chance {chance * 100:.1f} %; {seeds_text}; total {total:.0f} s")
    if not args.no_write:
        body = "\n".join([
            f"### {block_heading(args.title)} (`benchmarks/confounded.py`)", "",
            f"Command: `PYTHONPATH=$PWD {command_line()}`  ",
            f"Machine: {machine()}  ",
            f"Measured {stamp()}; whole script {total:.0f} s (data {t_data:.1f} s, confounders {t_conf:.1f} s).", "",
            f"SCM: `{scm.to_dict()}`  ",
            f"Heads: frames {args.frames}, layers {args.layers}, epochs {args.epochs}, batch {args.batch_size}, "
            f"lr {args.lr}, K_p {args.kp}, K_z {args.kz} (read by the dictionary approximator only); best epoch chosen on val (in distribution); {seeds_text}.", "",
            markdown(rows, chance)])
        update_section(args.section, body)
        console.print("updated BENCHMARKS.md")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
