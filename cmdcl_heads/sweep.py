"""`cmdcl-heads sweep`: a grid of option values x seeds over a base configuration, one run folder per point.

    sweeps/NAME/
        sweep.json                 the manifest: axes, and per point its index, folder, values, config hash
        base.toml                  the resolved base options (flags, --config, --preset folded in)
        slurm.sh                   with --slurm: an array job, one task per point (written, never submitted)
        layers=4,seed=1/           an ordinary run folder (cmdcl_heads/run.py), plus
            point.toml             the point's options, as `train --config` reads them
            point.json             its index, values and config hash
            train.log              what its `cmdcl-heads train` printed
        results.md, results.csv, sweep.png     `cmdcl-heads collect` (run at the end of a local sweep)

A point is identified by the hash of its resolved configuration, without the options that do not change a
result (RESUME_FREE: device, workers, paths...). A point whose folder holds summary.json is finished and is
never touched again; one with last.safetensors but no summary resumes through `train --resume`; a folder
whose point.json names another hash is refused (the sweep's options changed: choose another --out).
Each point is its own `cmdcl-heads train` process, so a failing point is reported and the others still run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import shlex
import signal
import subprocess
import sys
import threading
import tomllib
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cmdcl_cache.config import ConfigError, cli_fields, coerce, read_toml
from cmdcl_cache import CacheError
from cmdcl_cache import BUILTIN_DATASETS, resolve_dataset_dir, write_atomic

from .config import RESUME_FREE, HeadConfig, TrainConfig
from .run import CONFIG_FILE, RunFolder, config_toml

SWEEP_FILE, BASE_FILE, SLURM_FILE = "sweep.json", "base.toml", "slurm.sh"
POINT_CONFIG, POINT_FILE, LOG_FILE = "point.toml", "point.json", "train.log"
MANIFEST_VERSION = 1
MAX_NAME = 96   # longer point names fall back to p-<hash>

# The paper's ablation table: the full head and each causal part switched off in turn.
ABLATION = {"full": {}, "no-tci": {"tci": False}, "no-vci": {"vci": False}, "no-mediator": {"mediator": False},
            "no-cross-sample": {"cross_sample": False}}
ABLATION_AXIS = "variant"
# eval_every may change on a resume, but it decides which epoch is selected: a point's hash includes it.
RESULT_FREE = RESUME_FREE - {"eval_every"}
NOT_AXES = RESULT_FREE | {"out"}   # they do not change a run's result, or they are the sweep's own
INPUTS = ("cache", "dataset")      # left out of the hash, so one --out must keep them (sweep.json records them)
# What `train` fills in from the cache and manifest when it writes config.toml (prepare.resolve_config).
RESOLVED_BY_TRAIN = frozenset({"label_set", "select_split", "tokens", "fine_label_set", "dim", "num_classes",
                               "num_fine", "kp", "kz", "tokens_per_frame"})


@dataclass(frozen=True)
class Axis:
    """One swept dimension: labels as they appear in folder names and tables, and what each sets."""
    name: str
    labels: tuple[str, ...]
    overrides: tuple[dict, ...]


@dataclass(frozen=True)
class Point:
    index: int
    name: str
    labels: dict          # axis name -> label
    head: HeadConfig
    train: TrainConfig
    hash: str

    @property
    def folder(self) -> Path:
        return Path(self.train.out)


@dataclass(frozen=True)
class SweepSpec:
    """What the command line asked for, beyond the base options; enough to write the same command again."""
    grid: tuple[str, ...] = ()
    seeds: int = 1
    ablation: bool = False


# ------------------------------------------------------------------------------------------------ the grid

def option_hints() -> dict:
    """Every option a grid may sweep: name -> its annotated type."""
    out = {}
    for cls in (HeadConfig, TrainConfig):
        hints = typing.get_type_hints(cls)
        out.update({f.name: hints[f.name] for f in cli_fields(cls) if f.name not in NOT_AXES})
    return out


def parse_value(text: str, hint, where: str):
    """A grid value as the option's type: `true`/`false` for switches, `none` for an unset optional."""
    args = typing.get_args(hint)
    if text.lower() == "none" and type(None) in args:
        return None
    inner = next((a for a in args if a is not type(None)), hint) if type(None) in args else hint
    if inner is bool:
        value = {"true": True, "yes": True, "on": True, "1": True,
                 "false": False, "no": False, "off": False, "0": False}.get(text.lower(), text)
    elif inner is int:
        value = int(text) if re.fullmatch(r"[+-]?\d+", text) else text
    elif inner is float:
        try:
            value = float(text)
        except ValueError:
            value = text
        if value != value:
            raise ConfigError(f"{where}: NaN is not a setting")
    else:
        value = text
    return coerce(value, hint, where)


def parse_axis(text: str) -> Axis:
    """`--grid NAME=V1,V2,...` -> Axis; an unknown option or a value of the wrong type is refused by name."""
    where = f"--grid {text!r}"
    name, sep, values = text.partition("=")
    key = name.strip().replace("-", "_")
    hints = option_hints()
    if not sep or not key:
        raise ConfigError(f"{where}: expected OPTION=V1,V2,... (e.g. layers=0,2,4)")
    if key not in hints:
        why = "does not change a run's result" if key in NOT_AXES else "is no option of `cmdcl-heads train`"
        raise ConfigError(f"{where}: {name.strip()!r} {why}; options a grid may sweep: {', '.join(sorted(hints))}")
    labels = tuple(v.strip() for v in values.split(","))
    if not all(labels):
        raise ConfigError(f"{where}: an empty value")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where}: a value is given twice")
    parsed = tuple({key: parse_value(v, hints[key], f"{where}: {v!r}")} for v in labels)
    return Axis(key, labels, parsed)


def seed_axis(seeds: int, base_seed: int) -> Axis:
    seeds_ = [base_seed + i for i in range(seeds)]
    return Axis("seed", tuple(map(str, seeds_)), tuple({"seed": s} for s in seeds_))


def ablation_axis() -> Axis:
    return Axis(ABLATION_AXIS, tuple(ABLATION), tuple(ABLATION.values()))


def axes_of(spec: SweepSpec, head: HeadConfig, train: TrainConfig) -> list[Axis]:
    """The ablation variants first, then the grid in the order given, the seeds last."""
    if spec.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {spec.seeds}")
    axes = [ablation_axis()] if spec.ablation else []
    if spec.ablation and head.model != "cmdcl":
        raise ConfigError(f"--ablation switches CMDCL's parts; --model {head.model} has none (use --model cmdcl)")
    axes += [parse_axis(g) for g in spec.grid]
    owner = {}
    for axis in axes:
        for key in sorted({k for o in axis.overrides for k in o}):
            if key in owner:
                raise ConfigError(f"--grid: {key!r} is swept twice ({owner[key]} and {axis.name})")
            owner[key] = axis.name
    if "seed" in owner:
        if spec.seeds > 1:
            raise ConfigError("--grid seed=... and --seeds both set the seeds; give one")
    else:
        axes.append(seed_axis(spec.seeds, train.seed))
    return axes


# ---------------------------------------------------------------------------------------------- the points

def config_hash(head: HeadConfig, train: TrainConfig) -> str:
    """sha256 of the options that decide the result (not device, paths, workers: RESULT_FREE)."""
    def decisive(cfg):
        return {f.name: getattr(cfg, f.name) for f in cli_fields(type(cfg)) if f.name not in RESULT_FREE}
    text = json.dumps({"head": decisive(head), "train": decisive(train)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def point_name(labels: dict, digest: str) -> str:
    """`layers=4,seed=1`; a name with characters unsafe in a path, or too long, becomes p-<hash>."""
    name = ",".join(f"{k}={v}" for k, v in labels.items())
    if len(name) > MAX_NAME or not re.fullmatch(r"[A-Za-z0-9._+=,-]+", name):
        return f"p-{digest[:16]}"
    return name


def plan(spec: SweepSpec, head: HeadConfig, train: TrainConfig) -> list[Point]:
    """Every point of the grid, resolved and checked, before anything runs."""
    axes = axes_of(spec, head, train)
    out = Path(train.out).absolute()
    known = recorded_folders(out)
    points, seen = [], {}
    for index, combo in enumerate(itertools.product(*(range(len(a.labels)) for a in axes))):
        labels = {a.name: a.labels[i] for a, i in zip(axes, combo)}
        values = {k: v for a, i in zip(axes, combo) for k, v in a.overrides[i].items()}
        where = f"--grid point {','.join(f'{k}={v}' for k, v in labels.items())}"
        p_head, p_train = _with(head, values, where), _with(train, {**values, "resume": False}, where)
        digest = config_hash(p_head, p_train)
        if digest in seen:
            raise ConfigError(f"{where} has the same configuration as point {seen[digest]}")
        name = known.get(digest) or point_name(labels, digest)
        seen[digest] = name
        p_train = dataclasses.replace(p_train, out=str(out / name))
        points.append(Point(index, name, labels, p_head, p_train, digest))
    return points


def recorded_folders(out: Path) -> dict:
    """hash -> folder name of the points an earlier run of this sweep recorded: a point is its hash, so a
    reordered --grid, another spelling of a value (`00`) or a new axis at the base's value finds its folder."""
    if not (out / SWEEP_FILE).is_file():
        return {}
    return {entry["hash"]: entry["name"] for entry in read_manifest(out)["points"]
            if (out / entry["name"] / POINT_FILE).is_file()}


def _with(cfg, values: dict, where: str):
    own = {k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(cfg)}}
    try:
        return dataclasses.replace(cfg, **own)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def absolute_paths(train: TrainConfig) -> TrainConfig:
    """Paths as absolute ones, so that a Slurm task started in any folder reads the same files. `demo` is a
    folder found from the current one (CMDCL_DEMO or ./demo/manifest); the other built-in names stay names."""

    dataset = train.dataset
    if dataset == "demo" or dataset not in BUILTIN_DATASETS:
        dataset = str(resolve_dataset_dir(dataset).absolute())
    return dataclasses.replace(train, cache=str(Path(train.cache).absolute()), dataset=dataset,
                               out=str(Path(train.out).absolute()))


# ------------------------------------------------------------------------------------------ point folders

def point_state(point: Point) -> str:
    """new, partial (resume it) or done; a folder holding another configuration is refused."""
    folder = point.folder
    if not folder.exists():
        return "new"
    record, run = folder / POINT_FILE, RunFolder(folder)
    if not record.is_file():   # a folder another Slurm task is preparing is new; someone's run is not ours
        if run.has_run or run.read_summary() is not None:
            raise ConfigError(f"{folder}: holds a run but no {POINT_FILE}; not a point of this sweep (move it away)")
        return "new"
    recorded = json.loads(record.read_text()).get("hash")
    if recorded != point.hash:
        raise ConfigError(f"{folder}: a point of another configuration (config hash {str(recorded)[:12]}, this "
                          f"sweep's is {point.hash[:12]}); the sweep's options changed: choose another --out")
    if run.read_summary() is not None:
        return "done"
    return "partial" if run.has_run else "new"


def prepare_point(point: Point) -> None:
    """point.toml and point.json of an unfinished point (a finished one is never written to), under the run
    folder's lock: a folder a train is writing, or one holding another configuration's run, is refused."""
    run = RunFolder(point.folder)
    run.claim(create=True)   # CacheLockedError naming the train that holds it
    try:
        own = tomllib.loads(config_toml(point.head, point.train))
        if (point.folder / CONFIG_FILE).is_file():
            diff = config_difference(own, run.read_config())
            if diff:
                raise ConfigError(f"{point.folder}: holds the run of another configuration ({diff}); not this "
                                  "sweep's point: move it away and rerun the sweep")
        record = {"index": point.index, "name": point.name, "values": point.labels, "hash": point.hash}
        write_atomic(point.folder / POINT_FILE, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
        write_atomic(point.folder / POINT_CONFIG, ("# sweep point " + point.name + "\n"
                                                   + config_toml(point.head, point.train)).encode())
    finally:
        run.release()


def config_difference(point: dict, run: dict) -> str | None:
    """The first option (not RESUME_FREE, not one the trainer fills in from the data) in which a run's
    config.toml differs from a point's options, as 'train.lr 0.01, the point's 0.001'; None when none does."""
    for part in ("train", "head"):
        ours, theirs = point.get(part, {}), run.get(part, {})
        for key in sorted(set(ours) | set(theirs)):
            if key in RESUME_FREE or key in RESOLVED_BY_TRAIN:
                continue
            if ours.get(key) != theirs.get(key):
                return f"{part}.{key} {theirs.get(key)!r}, the point's {ours.get(key)!r}"
    return None


def train_command(point: Point, resume: bool) -> list[str]:
    return [sys.executable, "-m", "cmdcl_heads.cli", "train", "--config", str(point.folder / POINT_CONFIG),
            *(["--resume"] if resume else [])]


class Children:
    """The trainings running now, so that a SIGTERM or SIGINT of the sweep reaches them (a plain `kill PID`
    reaches the sweep alone) and no new point starts after it."""

    def __init__(self):
        self.lock, self.live, self.stopped_by = threading.Lock(), set(), None

    def run(self, cmd: list[str], log) -> int:
        with self.lock:
            if self.stopped_by is not None:
                return 128 + self.stopped_by
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            self.live.add(proc)
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.live.discard(proc)

    def forward(self, signum, _frame=None) -> None:
        with self.lock:
            self.stopped_by = signum
            for proc in self.live:
                proc.send_signal(signum)


CHILDREN = Children()


def run_point(point: Point) -> int:
    """Train one point in its own process (0 also when it was already done); its output goes to train.log."""
    state = point_state(point)
    if state == "done":
        return 0
    if CHILDREN.stopped_by is not None:   # the sweep was stopped: start no new point
        return 128 + CHILDREN.stopped_by
    try:
        prepare_point(point)
    except (ConfigError, CacheError) as err:   # another train's folder: reported as this point's failure
        print(f"error: {err}", file=sys.stderr)
        return 2
    with open(point.folder / LOG_FILE, "a") as log:
        return CHILDREN.run(train_command(point, state == "partial"), log)


def run_points(points: list[Point], jobs: int, quiet: bool) -> list[tuple[Point, int]]:
    """Run the points, `jobs` at a time; returns the failed ones with their exit codes."""
    from .train import progress_bar

    failed = []
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, CHILDREN.forward)
    with progress_bar(quiet) as progress, ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        task = progress.add_task("sweep", total=len(points))
        for point, code in zip(points, pool.map(run_point, points)):
            progress.advance(task)
            if code:
                failed.append((point, code))
    return failed


# ------------------------------------------------------------------------------- manifest and Slurm script

def manifest(spec: SweepSpec, points: list[Point], axes: list[Axis], train: TrainConfig) -> dict:
    return {"version": MANIFEST_VERSION, "grid": list(spec.grid), "seeds": spec.seeds, "ablation": spec.ablation,
            "inputs": {key: getattr(train, key) for key in INPUTS},
            "axes": [{"name": a.name, "labels": list(a.labels)} for a in axes],
            "points": [{"index": p.index, "name": p.name, "values": p.labels, "hash": p.hash} for p in points]}


def write_if_changed(path: Path, text: str) -> None:
    """A file that already holds these bytes is left alone (its time stamp too)."""
    if not path.is_file() or path.read_text() != text:
        write_atomic(path, text.encode())


def sweep_command(out: Path, spec: SweepSpec) -> list[str]:
    """The command line that plans this sweep again from its base.toml."""
    return (["cmdcl-heads", "sweep", "--config", str(out / BASE_FILE), "--out", str(out)]
            + [a for g in spec.grid for a in ("--grid", g)] + ["--seeds", str(spec.seeds)]
            + (["--ablation"] if spec.ablation else []))


def check_slurm_path(out: Path) -> None:
    if re.search(r'[\s"\'\\]', str(out)):   # sbatch reads #SBATCH lines with its own parser, not the shell's
        raise ConfigError(f"--out {str(out)!r}: a path with spaces or quotes cannot be written into #SBATCH "
                          "lines; choose an --out without them for --slurm")


def slurm_script(out: Path, spec: SweepSpec, count: int) -> str:
    check_slurm_path(out)
    task = shlex.join(sweep_command(out, spec) + ["--point"]) + ' "$SLURM_ARRAY_TASK_ID"'
    return "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name=cmdcl-sweep-{out.name}",
        f"#SBATCH --array=0-{count - 1}",
        f"#SBATCH --output={out}/slurm-%A_%a.out",
        "#SBATCH --cpus-per-task=4",
        "# Add your cluster's resources (--partition, --gres=gpu:1, --time) above, then: sbatch "
        + shlex.quote(str(out / SLURM_FILE)),
        "# Each task trains one point of the sweep (a finished point is skipped, a half-finished one resumed).",
        f"# When the array has ended: cmdcl-heads collect {shlex.quote(str(out))}",
        "set -euo pipefail",
        task, ""])


# ---------------------------------------------------------------------------------------------- the command

def sweep(head: HeadConfig, train: TrainConfig, spec: SweepSpec, jobs: int = 1, slurm: bool = False,
          point: int | None = None) -> dict:
    """Plan, record, then run every point (or only `point`, or write the Slurm script). Returns
    {"points": [...], "failed": [(Point, code)], "script": Path | None, "stopped": signal name | None}."""
    train = absolute_paths(train)
    out = Path(train.out)
    if slurm:
        check_slurm_path(out)
    points = plan(spec, head, train)
    if point is not None and not 0 <= point < len(points):
        raise ConfigError(f"--point {point}: this sweep has points 0..{len(points) - 1}")
    for p in points:
        point_state(p)   # a folder of another configuration is refused before anything runs
    record = manifest(spec, points, axes_of(spec, head, train), train)
    check_out(out, record)
    if point is not None:   # a Slurm task: the sweep was recorded when its script was written
        if read_manifest(out) != record:
            raise ConfigError(f"{out / SWEEP_FILE}: records other points than these options give; the sweep's "
                              "options changed since it was written (run it again with --slurm, or another --out)")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_if_changed(out / BASE_FILE, "# The base options of this sweep (cmdcl-heads sweep --config).\n"
                         + config_toml(head, train))
        write_if_changed(out / SWEEP_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    if slurm:
        script = out / SLURM_FILE
        write_if_changed(script, slurm_script(out, spec, len(points)))
        return {"points": points, "failed": [], "script": script}
    if point is not None:
        points = [points[point]]
    failed = run_points(points, jobs, train.quiet)
    stopped = signal.Signals(CHILDREN.stopped_by).name if CHILDREN.stopped_by is not None else None
    return {"points": points, "failed": failed, "script": None, "stopped": stopped}


def failure_reason(point: Point) -> str:
    """The last line a failed point's training printed (e.g. that another training holds the folder)."""
    try:
        lines = [line.strip() for line in (point.folder / LOG_FILE).read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    return next((line for line in reversed(lines) if line), "")


def check_out(out: Path, record: dict) -> None:
    """--out must not be a run folder, and a sweep rerun into it must read the same cache and dataset: they are
    not part of a point's hash, so a table would otherwise mix results of two caches."""
    if RunFolder(out).has_run or (out / "config.toml").is_file():
        raise ConfigError(f"--out {out}: is a run folder (it holds config.toml or checkpoints), not a sweep folder;"
                          " choose another --out")
    if not (out / SWEEP_FILE).is_file():
        return
    recorded = read_manifest(out).get("inputs", {})
    for key in INPUTS:
        if key in recorded and recorded[key] != record["inputs"][key]:
            raise ConfigError(f"--{key} {record['inputs'][key]}: this sweep folder ({out / SWEEP_FILE}) was run with "
                              f"--{key} {recorded[key]}; its table would mix both: choose another --out")


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / SWEEP_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: no sweep manifest (is {folder} a folder written by `cmdcl-heads sweep`?)")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        raise ConfigError(f"{path}: not a sweep manifest of version {MANIFEST_VERSION}")
    for key in ("axes", "points"):
        if not isinstance(data.get(key), list):
            raise ConfigError(f"{path}: no {key!r} list (a damaged or hand-edited sweep manifest)")
    axes = [a.get("name") if isinstance(a, dict) else None for a in data["axes"]]
    if None in axes:
        raise ConfigError(f"{path}: axes[{axes.index(None)}] has no 'name'")
    for i, entry in enumerate(data["points"]):
        missing = [k for k in ("name", "values", "hash") if not isinstance(entry, dict) or k not in entry]
        missing += [f"values.{a}" for a in axes if not missing and a not in entry["values"]]
        if missing:
            raise ConfigError(f"{path}: points[{i}] has no {missing[0]!r}")
    return data


def finished_points(folder: str | Path) -> list[tuple[dict, RunFolder]]:
    """(manifest entry, run folder) of every point that has finished, in the manifest's order."""
    folder = Path(folder)
    out = []
    for entry in read_manifest(folder)["points"]:
        run = RunFolder(folder / entry["name"])
        if run.read_summary() is not None:
            check_point_run(entry, run)
            out.append((entry, run))
    return out


def check_point_run(entry: dict, run: RunFolder) -> None:
    """A finished point's folder holds the run of that point: its point.json names the point's hash and its
    config.toml has the point's options (another train may have written the folder). ConfigError otherwise."""
    record, options = run.path / POINT_FILE, run.path / POINT_CONFIG
    try:
        recorded = json.loads(record.read_text()).get("hash")
        diff = config_difference(read_toml(options), run.read_config())
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"{run.path}: not a point of this sweep ({record.name} or {options.name} unreadable: "
                          f"{err})") from None
    if recorded != entry["hash"]:
        raise ConfigError(f"{run.path}: {record.name} names config hash {str(recorded)[:12]}, the sweep's point "
                          f"{entry['hash'][:12]}: not this sweep's run")
    if diff:
        raise ConfigError(f"{run.path}: its run was trained with other options than the point's ({diff}): "
                          "another train wrote this folder; move it away and rerun the sweep")
