"""Confounder dictionaries for CMDCL: V_P (textual back-door) and Z (visual front-door), `confounders.h5`.

What the paper shows (figure 4, ../shared/paper/): visual prototypes V_P "generated" by the frozen vision
model enter the textual intervention together with the label texts T; no visual dictionary is drawn in the
visual intervention (its approximator reads T'). Z, a k-means dictionary of training frames, is read only by
`train --approximator dictionary` (*after CATT / ours*), so `confounders build` makes it only when asked
(`--kz K`; default 0: the file then has no z / z_prior datasets, and heads that do not read Z load it as
before; a file with Z serves every head). What we chose (*inferred*):

- Both dictionaries come from the TRAINING split only (frames of training videos under the chosen split
  scheme), so that nothing of the test videos leaks into the model through its dictionaries.
- k-means with FAISS, spherical (on L2-normalised features, unit-norm centroids) by default; CLIP compares
  features by cosine, so the clusters should too. V_P uses `seed`, Z uses `seed + 1` so that the two
  initialisations are not the same draw.
- At most `max_points` frames are clustered, a uniform sample without replacement drawn with `seed` over
  all training frames. The priors are cluster frequencies over ALL training frames (a second, streaming
  pass assigns every frame to its nearest centroid), not just over the sample.
- `prototypes="class-mean"`: V_P = mean frame feature per label (renormalised when spherical), using the
  segments of the fine label set where a video has them and its video-level labels otherwise; prior =
  share of training frames carrying that label. Labels without any training frame are dropped (their
  keys are stored in `vp_labels`, so plots can name each row).

The file stores a fingerprint of the cache it was built from (sha256 over the sorted provenance, video ids
with their frame counts and per-shard row counts), the settings, the k-means objectives and the FAISS
version; `load(path, cache=...)` refuses a dictionary built from another cache.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch

from cmdcl_cache import Cache, locate
from cmdcl_cache.config import check_choices, option
from cmdcl_cache import CacheError, ProvenanceError
from cmdcl_cache import WriterLock, load_manifest, lock_path_of, write_small_h5

FILE_NAME = "confounders.h5"
SCHEMA_VERSION = 1
DEFAULT_MAX_POINTS = 262_144


@dataclass(frozen=True)
class ConfoundersConfig:
    """`cmdcl-heads confounders build`: its flags (and --config keys); recorded in confounders.h5."""

    cache: str = option(None, "A cache folder, or a folder above it.", required=True)
    dataset: str = option(None, "Manifest: built-in name or folder.", required=True)
    kp: int = option(256, "K_p: bias prototypes V_P (textual back-door).")
    kz: int = option(0, "K_z: frame dictionary Z, read only by `train --approximator dictionary` (*after "
                        "CATT / ours*; 512 before); 0: not built (the figure-4 default reads T' instead).")
    niter: int = option(20, "k-means iterations.")
    seed: int = option(0, "Seed of the point sample and of k-means (Z uses seed + 1).")
    spherical: bool = option(True, "Spherical k-means on L2-normalised features.")
    max_points: int = option(262_144, "Frames sampled (seeded) for k-means.")
    prototypes: Literal["kmeans", "class-mean"] = option("kmeans", "V_P from k-means centroids or class means.")
    split_scheme: str | None = option(None, "Split scheme whose training split is used.")
    label_set: str | None = option(None, "Labels of class-mean prototypes (default: the fine set).")
    threads: int | None = option(None, "FAISS OpenMP threads.")
    out: str | None = option(None, "Output file (default: <cache folder>/confounders.h5).")

    def __post_init__(self):
        check_choices(self)
        if min(self.kp, self.niter, self.max_points) < 1 or self.kz < 0:
            raise ValueError("--kp, --niter and --max-points must be >= 1, --kz >= 0 (0: no Z)")


def build_and_save(config: ConfoundersConfig) -> tuple["Confounders", Path]:
    """Build the dictionaries of `config` and write them (with the configuration in their settings)."""

    manifest = load_manifest(config.dataset)
    folder = locate(config.cache, manifest.dataset)
    out = Path(config.out) if config.out else folder.confounders_path
    with WriterLock(lock_path_of(out), out.name, "confounders build"):   # one build per file: no last-writer-wins
        return _build_and_save(config, manifest, folder, out)


def _build_and_save(config: ConfoundersConfig, manifest, folder, out: Path) -> tuple["Confounders", Path]:
    conf = build_confounders(folder.open(), manifest, kp=config.kp, kz=config.kz, niter=config.niter,
                             seed=config.seed, spherical=config.spherical, max_points=config.max_points,
                             prototypes=config.prototypes, split_scheme=config.split_scheme,
                             label_set=config.label_set, threads=config.threads)
    conf.settings["config"] = asdict(config)
    return conf, conf.save(out)


def render(conf: "Confounders", path: Path, console) -> None:
    from rich.table import Table

    s = conf.settings
    table = Table(title=f"confounders of {s['dataset']}", show_header=True)
    for col in ("dictionary", "K", "source", "k-means objective", "max prior", "min prior"):
        table.add_column(col)
    source = "kmeans" if s["prototypes"] == "kmeans" else f"class means ({s['label_set']})"
    table.add_row("V_P", str(len(conf.vp)), source, f"{s['objective'].get('vp', float('nan')):.4g}",
                  f"{conf.vp_prior.max():.4f}", f"{conf.vp_prior.min():.4f}")
    if conf.z is not None:
        table.add_row("Z", str(len(conf.z)), "kmeans", f"{s['objective']['z']:.4g}", f"{conf.z_prior.max():.4f}",
                      f"{conf.z_prior.min():.4f}")
    else:
        table.add_row("Z", "-", "not built (--kz 0: only `--approximator dictionary` reads it)", "", "", "")
    console.print(table)
    console.print(f"{s['train_videos']} training videos, {s['train_frames']} frames ({s['points']} clustered); "
                  f"wrote {path}", markup=False)


def build_command(cache_dir, dataset="DATASET") -> str:
    """The command that builds the dictionaries, for error messages."""
    return f"cmdcl-heads confounders build --cache {cache_dir} --dataset {dataset}"


@dataclass
class Confounders:
    """The two dictionaries and their priors (float32 tensors) plus where they came from."""

    vp: torch.Tensor                   # [Kp, D] V_P: bias prototypes (k-means centroids or class means)
    vp_prior: torch.Tensor             # [Kp]   P(b), sums to 1
    z: torch.Tensor | None             # [Kz, D] Z: frame dictionary (None: not built, --kz 0)
    z_prior: torch.Tensor | None       # [Kz]   P(z), sums to 1
    settings: dict = field(default_factory=dict)
    cache_fingerprint: str = ""
    vp_labels: list[str] | None = None  # label key of each V_P row (class-mean prototypes only)

    def __post_init__(self):
        if (self.z is None) != (self.z_prior is None):
            raise ValueError("confounders: z and z_prior come together (both or neither)")
        for name in self._arrays():
            setattr(self, name, torch.as_tensor(np.asarray(getattr(self, name)), dtype=torch.float32))
        z = self.vp if self.z is None else self.z
        if self.vp.ndim != 2 or z.ndim != 2 or self.vp.shape[1] != z.shape[1]:
            raise ValueError(f"confounders: vp {tuple(self.vp.shape)} and z {tuple(z.shape)} "
                             "must be [K, D] with the same D")
        if self.vp_prior.shape != self.vp.shape[:1] or (self.z is not None and self.z_prior.shape != z.shape[:1]):
            raise ValueError("confounders: each prior must have one entry per dictionary row")

    def _arrays(self) -> tuple[str, ...]:
        return ("vp", "vp_prior") + (("z", "z_prior") if self.z is not None else ())

    @property
    def dim(self) -> int:
        return int(self.vp.shape[1])

    def problem(self) -> str | None:
        """What makes these dictionaries unusable (non-finite entries, priors that are not distributions)."""
        for name in self._arrays():
            if not torch.isfinite(getattr(self, name)).all():
                return f"{name} holds NaN/Inf"
        for name in (n for n in self._arrays() if n.endswith("_prior")):
            prior = getattr(self, name)
            if (prior < 0).any() or abs(float(prior.sum()) - 1.0) > 1e-3:
                return f"{name} is not a distribution (negative, or its sum {float(prior.sum()):.4f} is not 1)"
        return None

    def save(self, path: str | Path) -> Path:

        def fill(f):
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["cache_fingerprint"] = self.cache_fingerprint
            f.attrs["settings"] = json.dumps(self.settings, sort_keys=True)
            for name in self._arrays():   # no z datasets when Z was not built
                f.create_dataset(name, data=getattr(self, name).numpy(), track_times=False)
            if self.vp_labels is not None:
                f.create_dataset("vp_labels", data=np.array(self.vp_labels, dtype=h5py.string_dtype()),
                                 track_times=False)

        return write_small_h5(path, fill)

    @classmethod
    def load(cls, path: str | Path, cache: Cache | None = None) -> "Confounders":
        """Read `confounders.h5`; with `cache`, check that it was built from that cache."""
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        if not path.exists():
            where = cache.dir if cache is not None else path.parent
            raise CacheError(f"{path}: no confounder dictionaries; build them with `{build_command(where)}`")
        try:
            with h5py.File(path, "r") as f:
                has_z = "z" in f or "z_prior" in f   # one without the other is a KeyError below
                out = cls(vp=f["vp"][:], vp_prior=f["vp_prior"][:], z=f["z"][:] if has_z else None,
                          z_prior=f["z_prior"][:] if has_z else None,
                          settings=json.loads(f.attrs["settings"]),
                          cache_fingerprint=str(f.attrs["cache_fingerprint"]),
                          vp_labels=[s.decode() for s in f["vp_labels"][:]] if "vp_labels" in f else None)
            if not isinstance(out.settings, dict):
                raise ValueError("settings are not a JSON object")
        except (OSError, KeyError, ValueError, TypeError, AttributeError) as err:
            raise CacheError(f"{path}: not a readable confounders file ({type(err).__name__}: {err}); rebuild it "
                             f"with `{build_command(path.parent)}`") from None
        problem = out.problem()
        if problem:
            raise CacheError(f"{path}: {problem}; rebuild it with `{build_command(path.parent)}`")
        if cache is not None:
            expected = cache_fingerprint(cache)
            if out.cache_fingerprint != expected:
                raise ProvenanceError(
                    f"{path}: built from another cache (fingerprint {out.cache_fingerprint[:12]}…, this cache "
                    f"is {expected[:12]}…); rebuild with `{build_command(cache.dir)}`")
        return out


def save(confounders: Confounders, path) -> Path:
    return confounders.save(path)


def load(path, cache: Cache | None = None) -> Confounders:
    return Confounders.load(path, cache)


def needs_z(cfg) -> bool:
    """Whether a head configuration reads Z: CMDCL's VCI approximator in its dictionary reading only."""
    return cfg.model == "cmdcl" and cfg.vci and cfg.cross_sample and cfg.approximator == "dictionary"


def needed_by(cfg) -> bool:
    """Whether a head configuration reads the dictionaries (CMDCL with TCI: V_P; the dictionary approximator: Z)."""
    return cfg.model == "cmdcl" and (cfg.tci or needs_z(cfg))


def training_ids(cache: Cache, manifest, split_scheme: str | None) -> list[str]:
    """The training videos of `split_scheme` that the cache holds: what the dictionaries are built from."""
    return sorted(v.video_id for v in manifest.select("train", split_scheme) if v.video_id in cache)


def load_for_training(cache: Cache, cfg, dataset: str = "DATASET", manifest=None,
                      split_scheme: str | None = None) -> Confounders | None:
    """The dictionaries of `cache` when `cfg` needs them (checked against the cache), else None.

    A missing file raises a CacheError that names the command to build it. With `manifest`, the file must
    have been built from this run's training videos (same split scheme, same ids): dictionaries built
    under another scheme would hold this run's test frames.
    """
    if not needed_by(cfg):
        return None
    path = Path(cache.dir) / FILE_NAME
    if not path.exists():
        raise CacheError(f"{path}: CMDCL needs the confounder dictionaries; build them with "
                         f"`{build_command(cache.dir, dataset)}`" + (" --kz 512" if needs_z(cfg) else "")
                         + " (or train with --no-tci" + (" --no-cross-sample)" if needs_z(cfg) else ")"))
    conf = Confounders.load(path, cache=cache)
    if needs_z(cfg) and conf.z is None:
        raise CacheError(f"{path}: built without the frame dictionary Z, which --approximator dictionary reads; "
                         f"rebuild with `{build_command(cache.dir, dataset)} --kz 512`, or use --approximator text")
    if conf.dim != cache.feature_dim:
        raise CacheError(f"{path}: its dictionaries have D={conf.dim}, the cache's features D={cache.feature_dim}; "
                         f"rebuild them with `{build_command(cache.dir, dataset)}`")
    if manifest is not None:
        built = conf.settings.get("split_scheme")
        ids_sha = hashlib.sha256("\n".join(training_ids(cache, manifest, split_scheme)).encode()).hexdigest()
        if conf.settings.get("train_ids_sha256") != ids_sha:
            raise CacheError(f"{path}: built from the training videos of split scheme {built or 'default'}, "
                             f"not those of this run (split scheme {split_scheme or 'default'}); rebuild with "
                             f"`{build_command(cache.dir, dataset)}`"
                             + (f" --split-scheme {split_scheme}" if split_scheme else ""))
    return conf


# ------------------------------------------------------------------------------------------ fingerprint

def cache_fingerprint(cache: Cache) -> str:
    """sha256 over the sorted provenance, every (video id, frame count) and the rows of each shard."""
    return cache.fingerprint()


# ---------------------------------------------------------------------------------------------- build

def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _frame_labels(video, times: np.ndarray, label_set, set_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(frame rows, label ids) pairs: segments of `set_name` where the video has them, else video labels."""
    rows, labels = [], []
    segs = [s for s in video.segments if s["set"] == set_name]
    if segs:
        for s in segs:
            hit = np.nonzero((times >= s["start"]) & (times < s["end"]))[0]  # [start, end): no shared frame
            rows.append(hit)
            labels.append(np.full(len(hit), label_set.index(s["label"])))
    elif video.labels.get(set_name) is not None:
        value = video.labels[set_name]
        for key in ([value] if isinstance(value, str) else value):
            rows.append(np.arange(len(times)))
            labels.append(np.full(len(times), label_set.index(key)))
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows).astype(np.int64), np.concatenate(labels).astype(np.int64)


def spherical_or_l2_kmeans(x: np.ndarray, k: int, niter: int, seed: int, spherical: bool, name: str):
    import faiss

    n = x.shape[0]
    if k > n:
        warnings.warn(f"{name}: K={k} clusters requested but only {n} training points; using K={n}",
                      stacklevel=3)
        k = n
    # max_points_per_centroid high: our own seeded `max_points` sample is the only subsampling.
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=spherical, verbose=False,
                      max_points_per_centroid=max(256, (n + k - 1) // k + 1), min_points_per_centroid=1)
    km.train(x)
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    return centroids, float(km.obj[-1]) if len(km.obj) else float("nan")


def nearest_centroid_index(centroids: np.ndarray, spherical: bool):
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1]) if spherical else faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    return index


class _TrainingFrames:
    """The frames of the training videos that the cache holds, read one video at a time (normalised when
    spherical), each checked for NaN/Inf."""

    def __init__(self, cache: Cache, manifest, split_scheme: str | None, spherical: bool):
        train = manifest.select("train", split_scheme)
        self.records = {v.video_id: v for v in train if v.video_id in cache}
        if not self.records:
            raise CacheError(f"{cache.dir}: none of the {len(train)} training videos of {manifest.root} "
                             f"(split scheme {split_scheme or 'default'}) is in the cache")
        if len(train) > len(self.records):
            warnings.warn(f"{len(train) - len(self.records)} of {len(train)} training videos are not in the cache "
                          "(failed extraction?); building from the others", stacklevel=3)
        self.cache, self.spherical = cache, spherical
        self.ids = training_ids(cache, manifest, split_scheme)
        counts = np.array([cache.num_frames(v) for v in self.ids], dtype=np.int64)
        self.total = int(counts.sum())
        self.starts = np.concatenate([[0], np.cumsum(counts)])

    def read(self, vid: str) -> np.ndarray:
        from .data import check_finite
        x = np.asarray(self.cache.features(vid), dtype=np.float32)
        check_finite(self.cache, vid, x)
        return _normalise(x) if self.spherical else x


class _ClassMeans:
    """Per-label sums of frame features: segments of the fine set where a video has them, else its labels."""

    def __init__(self, manifest, label_set: str | None, dim: int):
        self.set_name = label_set or manifest.fine_label_set or manifest.default_label_set
        if self.set_name not in manifest.label_sets:
            raise ValueError(f"--label-set {self.set_name!r}: {manifest.root}/labels.json has the label sets "
                             f"{', '.join(manifest.label_sets)}")
        self.lset = manifest.label_sets[self.set_name]
        self.root = manifest.root
        self.sums = np.zeros((len(self.lset), dim), dtype=np.float64)
        self.frames = np.zeros(len(self.lset), dtype=np.int64)

    def add(self, record, x: np.ndarray, times: np.ndarray) -> None:
        rows, labs = _frame_labels(record, times, self.lset, self.set_name)
        np.add.at(self.sums, labs, x[rows])
        self.frames += np.bincount(labs, minlength=len(self.lset))

    def prototypes(self, spherical: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
        keep = np.nonzero(self.frames)[0]
        if len(keep) == 0:
            raise CacheError(f"{self.root}: no training frame carries a '{self.set_name}' label; "
                             "class-mean prototypes need labelled frames")
        if len(keep) < len(self.lset):
            warnings.warn(f"class-mean V_P: {len(self.lset) - len(keep)} of {len(self.lset)} '{self.set_name}' "
                          "labels have no training frame and are left out", stacklevel=3)
        vp = (self.sums[keep] / self.frames[keep, None]).astype(np.float32)
        if spherical:
            vp = _normalise(vp).astype(np.float32)
        prior = (self.frames[keep] / self.frames[keep].sum()).astype(np.float32)
        return vp, prior, [self.lset.keys[c] for c in keep]


def _read_sample(frames: _TrainingFrames, chosen: np.ndarray, means: _ClassMeans | None, bar) -> np.ndarray:
    """Pass 1: the seeded sample of frames for k-means (and, for class means, the sums over all frames)."""
    sample = np.empty((len(chosen), frames.cache.feature_dim), dtype=np.float32)
    task = bar.add_task("reading training frames", total=len(frames.ids))
    filled = 0
    for i, vid in enumerate(frames.ids):
        lo, hi = np.searchsorted(chosen, [frames.starts[i], frames.starts[i + 1]])
        if hi > lo or means is not None:
            x = frames.read(vid)
            sample[filled:filled + hi - lo] = x[chosen[lo:hi] - frames.starts[i]]
            filled += hi - lo
            if means is not None:
                means.add(frames.records[vid], x, frames.cache.frame_info(vid)[1])
        bar.advance(task)
    assert filled == len(chosen)
    return sample


def _cluster_priors(frames: _TrainingFrames, sample: np.ndarray, centroids: dict, bar) -> dict:
    """Cluster frequencies over every training frame (the sample itself when it is every frame)."""
    hist = {k: np.zeros(len(c), dtype=np.int64) for k, c in centroids.items()}
    index = {k: nearest_centroid_index(c, frames.spherical) for k, c in centroids.items()}
    if len(sample) == frames.total:
        blocks = [sample]
    else:
        task = bar.add_task("cluster priors over all training frames", total=len(frames.ids))
        blocks = (frames.read(vid) for vid in frames.ids)
    for x in blocks:
        for k in centroids:
            hist[k] += np.bincount(index[k].search(x, 1)[1][:, 0], minlength=len(hist[k]))
        if len(sample) != frames.total:
            bar.advance(task)
    return {k: (h / frames.total).astype(np.float32) for k, h in hist.items()}


def build_confounders(cache: Cache | str | Path, manifest, kp: int = 256, kz: int = 0, niter: int = 20,
                      seed: int = 0, spherical: bool = True, max_points: int = DEFAULT_MAX_POINTS,
                      prototypes: str = "kmeans", split_scheme: str | None = None,
                      label_set: str | None = None, threads: int | None = None,
                      progress: bool = True) -> Confounders:
    """Build V_P and (kz > 0) Z from the training videos of `manifest` (under `split_scheme`) found in `cache`.

    `label_set` (class-mean prototypes only) defaults to the manifest's fine label set, else its default set.
    `threads` sets FAISS's OpenMP threads for the build (restored afterwards); results are deterministic
    for a given seed and machine.
    """
    import faiss
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, \
        TimeElapsedColumn

    if prototypes not in ("kmeans", "class-mean"):
        raise ValueError(f"prototypes must be 'kmeans' or 'class-mean', got {prototypes!r}")
    if min(kp, niter, max_points) < 1 or kz < 0:
        raise ValueError("kp, niter and max_points must be positive, kz >= 0 (0: no Z)")
    cache = cache if isinstance(cache, Cache) else Cache(cache)
    frames = _TrainingFrames(cache, manifest, split_scheme, spherical)
    n = min(frames.total, max_points)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(frames.total, size=n, replace=False)) if n < frames.total else np.arange(n)
    means = _ClassMeans(manifest, label_set, cache.feature_dim) if prototypes == "class-mean" else None
    old_threads = faiss.omp_get_max_threads()
    if threads:
        faiss.omp_set_num_threads(int(threads))
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    objective, vp_labels = {}, None
    try:
        with Progress(*columns, disable=not progress, transient=False) as bar:
            sample = _read_sample(frames, chosen, means, bar)

            def kmeans(name, k, s):
                task = bar.add_task(f"k-means {name} (K={min(k, n)}, {n} points)", total=1)
                out = spherical_or_l2_kmeans(sample, k, niter, s, spherical, name)
                bar.advance(task)
                return out

            if means is not None:
                vp, vp_prior, vp_labels = means.prototypes(spherical)
            else:
                vp, objective["vp"] = kmeans("V_P", kp, seed)
            z = None
            if kz:
                z, objective["z"] = kmeans("Z", kz, seed + 1)
            wanted = {**({} if means else {"vp": vp}), **({"z": z} if kz else {})}
            priors = _cluster_priors(frames, sample, wanted, bar) if wanted else {}
    finally:
        faiss.omp_set_num_threads(old_threads)
    vp_prior = vp_prior if means is not None else priors["vp"]
    settings = {
        "kp": int(kp), "kz": int(kz), "kp_effective": int(len(vp)), "kz_effective": int(len(z)) if z is not None else 0,
        "niter": int(niter), "seed": int(seed), "spherical": bool(spherical), "max_points": int(max_points),
        "prototypes": prototypes, "split_scheme": split_scheme,
        "label_set": means.set_name if means is not None else None,
        "train_videos": len(frames.ids), "train_frames": frames.total, "points": int(n),
        "train_ids_sha256": hashlib.sha256("\n".join(frames.ids).encode()).hexdigest(),
        "objective": objective, "faiss_version": faiss.__version__, "dataset": manifest.dataset,
    }
    return Confounders(vp=vp, vp_prior=vp_prior, z=z, z_prior=priors.get("z"), settings=settings,
                       cache_fingerprint=cache_fingerprint(cache), vp_labels=vp_labels)
