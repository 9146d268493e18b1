"""The demo set: procedurally rendered "long-term activities" with a controlled background confounder.

Recipe (also in manifests/demo/README.md):

* Eight **atomic actions**, each a bright glyph with a fixed colour and motion (a red circle sliding right,
  a yellow square spinning, a cyan triangle bouncing, a white bar growing, a magenta ring expanding, three
  orange dots orbiting, a green cross falling, a blue diamond weaving left).
* Four **activities**, each an *ordered* sequence of three or four atomic actions from that shared
  vocabulary. `assemble` and `disassemble` use the same three actions in opposite orders, `juggle` and
  `signal` share three of their four, so only order and combination tell activities apart.
* Four **backgrounds** (dusk gradient, green stripes, slate checkerboard, grey static), darker than every
  glyph. Background i is the "own" background of activity i.
* **Confounding.** In `train` and `val` (the in-distribution held-out split) a share `own_share` (default
  0.9) of the videos use their activity's own background, the rest cycle through the other backgrounds
  (rounded over the whole split, so with the defaults each activity has one train video off its own
  background and the background never determines the label outright). In `test` (the shifted split) each activity's videos
  cycle through all backgrounds, so background and activity are independent (exactly so when the number
  of test videos per activity is a multiple of four). Backgrounds are *assigned* in these proportions,
  not sampled, so the confounding strength is exact even for a few dozen videos.
* Each video lasts a random 6-10 s; its actions follow each other without gaps, each taking 15-40 % of
  the video. Glyph size, position and background phase are jittered per video. The per-segment start and
  end times in the manifest fall on frame boundaries (frame f spans [f / fps, (f + 1) / fps)).

Everything is numpy, deterministic in `seed` (a plan from one generator, then one generator per video).
Videos are H.264 (libx264 through PyAV, no B-frames, one thread so that the bytes do not depend on the
machine's core count) or MPEG-4 part 2 where the FFmpeg build lacks libx264. Video ids (`demo0000`, ...)
are shuffled so that they say nothing about split or label.

Output layout: `<out>/videos/<video_id>.mp4` and the manifest folder `<out>/manifest/` (videos.jsonl and
labels.json, see cmdcl_cache/manifest/format.py). Manifest paths are relative to the video root `<out>/videos`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cmdcl_cache.files import write_atomic
from cmdcl_cache.manifest.format import LABELS_FILE, VIDEOS_FILE

DATASET = "demo"
SPLIT_SCHEME = "default"

# key, text (the "name" that prompts are built from), RGB colour
ACTIONS: list[tuple[str, str, tuple[int, int, int]]] = [
    ("circle_slides_right", "a red circle sliding to the right", (235, 45, 45)),
    ("square_spins", "a yellow square spinning", (250, 215, 35)),
    ("triangle_bounces", "a cyan triangle bouncing", (40, 225, 235)),
    ("bar_grows", "a white bar growing upwards", (245, 245, 245)),
    ("ring_expands", "a magenta ring expanding", (235, 55, 225)),
    ("dots_orbit", "three orange dots orbiting", (255, 145, 20)),
    ("cross_falls", "a green cross falling down", (70, 235, 70)),
    ("diamond_weaves_left", "a blue diamond weaving to the left", (70, 110, 255)),
]

# key, text, ordered atomic actions, own background
ACTIVITIES: list[tuple[str, str, tuple[str, ...], str]] = [
    ("assemble", "assembling shapes: circle slides, bar grows, square spins",
     ("circle_slides_right", "bar_grows", "square_spins"), "dusk"),
    ("disassemble", "disassembling shapes: square spins, bar grows, circle slides",
     ("square_spins", "bar_grows", "circle_slides_right"), "stripes"),
    ("juggle", "juggling: triangle bounces, dots orbit, ring expands, cross falls",
     ("triangle_bounces", "dots_orbit", "ring_expands", "cross_falls"), "checker"),
    ("signal", "signalling: ring expands, diamond weaves, cross falls, triangle bounces",
     ("ring_expands", "diamond_weaves_left", "cross_falls", "triangle_bounces"), "static"),
]

BACKGROUNDS: list[str] = ["dusk", "stripes", "checker", "static"]
OWN_BACKGROUND: dict[str, str] = {key: bg for key, _, _, bg in ACTIVITIES}


@dataclass(frozen=True)
class VideoPlan:
    """Everything needed to render one video and write its manifest line."""

    video_id: str
    split: str
    activity: str
    background: str
    num_frames: int
    segments: tuple[tuple[str, int, int], ...]  # (action key, first frame, end frame exclusive)
    render_seed: tuple[int, int]


def _off_counts(n: int, own_share: float, rng: np.random.Generator) -> list[int]:
    """Videos per activity that are off their own background, rounded over the whole split (not per
    activity) so that the split's share comes as close to `own_share` as its size allows."""
    a = len(ACTIVITIES)
    total_off = int(math.floor((1.0 - own_share) * n * a + 0.5))
    counts = [total_off // a] * a
    for i in rng.choice(a, size=total_off % a, replace=False):
        counts[int(i)] += 1
    return [min(c, n) for c in counts]


def _backgrounds_for(activity_index: int, n: int, off: int | None, rng: np.random.Generator) -> list[str]:
    """Backgrounds of one activity's videos in one split; `off` None means independent of the activity."""
    b = len(BACKGROUNDS)
    if off is not None:
        others = [BACKGROUNDS[(activity_index + 1 + k) % b] for k in range(b - 1)]
        start = int(rng.integers(len(others)))
        names = [BACKGROUNDS[activity_index]] * (n - off)
        names += [others[(start + k) % len(others)] for k in range(off)]
    else:  # every background equally often, whatever the activity
        start = int(rng.integers(b))
        names = [BACKGROUNDS[(start + k) % b] for k in range(n)]
    rng.shuffle(names)
    return names


def _segments(actions: tuple[str, ...], num_frames: int, rng: np.random.Generator):
    weights = rng.uniform(0.7, 1.3, size=len(actions))
    bounds = np.floor(np.cumsum(weights) / weights.sum() * num_frames).astype(int)
    bounds[-1] = num_frames
    starts = np.concatenate([[0], bounds[:-1]])
    return tuple((a, int(s), int(e)) for a, s, e in zip(actions, starts, bounds))


def plan_demo(seed: int = 0, train: int = 10, val: int = 2, test: int = 8, fps: int = 8,
              own_share: float = 0.9, min_seconds: float = 6.0, max_seconds: float = 10.0) -> list[VideoPlan]:
    """The list of videos to render (per activity: `train`, `val`, `test` videos), sorted by video id."""
    if not 0.0 <= own_share <= 1.0:
        raise ValueError(f"own_share must lie in [0, 1], got {own_share}")
    if min(train, val, test) < 0 or train + val + test == 0:
        raise ValueError("videos per activity must be >= 0 and not all zero")
    if not 0 < min_seconds <= max_seconds:
        raise ValueError("need 0 < min_seconds <= max_seconds")
    rng = np.random.default_rng(seed)
    drafts = []
    for split, n in (("train", train), ("val", val), ("test", test)):
        off = _off_counts(n, own_share, rng) if split != "test" else [None] * len(ACTIVITIES)
        for a_index, (activity, _, actions, _) in enumerate(ACTIVITIES):
            for bg in _backgrounds_for(a_index, n, off[a_index], rng):
                num_frames = int(rng.integers(round(min_seconds * fps), round(max_seconds * fps) + 1))
                num_frames = max(num_frames, 2 * len(actions))
                drafts.append((split, activity, bg, num_frames, _segments(actions, num_frames, rng)))
    order = rng.permutation(len(drafts))  # ids must not reveal split or label
    plans = [VideoPlan(f"demo{new:04d}", *drafts[old], render_seed=(seed, new))
             for new, old in enumerate(order)]
    return sorted(plans, key=lambda p: p.video_id)


def _box(dx, dy, half_w, half_h, angle=0.0):
    """Signed distance (pixels) to a rectangle centred at the origin, rotated by `angle`."""
    c, s = math.cos(angle), math.sin(angle)
    qx = np.abs(c * dx + s * dy) - half_w
    qy = np.abs(-s * dx + c * dy) - half_h
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0)


def _triangle(dx, dy, circumradius, angle=0.0):
    """Distance bound for an equilateral triangle (exact inside, a lower bound outside: fine for edges)."""
    inradius = circumradius / 2.0
    d = None
    for k in range(3):
        theta = angle + math.pi / 2 + 2 * math.pi * k / 3  # outward edge normals (y down): apex up
        e = math.cos(theta) * dx + math.sin(theta) * dy - inradius
        d = e if d is None else np.maximum(d, e)
    return d


def _glyph_sdf(action: str, u: float, xs, ys, w: int, h: int, jitter: dict) -> np.ndarray:
    """Signed distance field (pixels) of the glyph of `action` at progress u in [0, 1]."""
    m = min(w, h) * jitter["scale"]
    ox, oy = jitter["dx"], jitter["dy"]

    def rel(fx, fy):
        return xs - (fx + ox) * w, ys - (fy + oy) * h

    if action == "circle_slides_right":
        dx, dy = rel(0.15 + 0.7 * u, 0.5)
        return np.hypot(dx, dy) - 0.12 * m
    if action == "square_spins":
        dx, dy = rel(0.5, 0.5)
        return _box(dx, dy, 0.17 * m, 0.17 * m, angle=math.pi * u)
    if action == "triangle_bounces":
        dx, dy = rel(0.5, 0.76 - 0.5 * abs(math.sin(3 * math.pi * u)))
        return _triangle(dx, dy, 0.17 * m)
    if action == "bar_grows":
        height = (0.12 + 0.72 * u) * h
        dx, dy = xs - (0.5 + ox) * w, ys - (0.94 * h - height / 2)
        return _box(dx, dy, 0.07 * m, height / 2)
    if action == "ring_expands":
        dx, dy = rel(0.5, 0.5)
        return np.abs(np.hypot(dx, dy) - (0.06 + 0.34 * u) * m) - 0.03 * m
    if action == "dots_orbit":
        d = None
        for k in range(3):
            a = 2 * math.pi * (u + k / 3)
            dx, dy = rel(0.5 + 0.27 * math.cos(a), 0.5 + 0.27 * math.sin(a))
            e = np.hypot(dx, dy) - 0.07 * m
            d = e if d is None else np.minimum(d, e)
        return d
    if action == "cross_falls":
        dx, dy = rel(0.5, 0.14 + 0.72 * u)
        return np.minimum(_box(dx, dy, 0.14 * m, 0.045 * m), _box(dx, dy, 0.045 * m, 0.14 * m))
    if action == "diamond_weaves_left":
        dx, dy = rel(0.85 - 0.7 * u, 0.5 + 0.22 * math.sin(4 * math.pi * u))
        return _box(dx, dy, 0.11 * m, 0.11 * m, angle=math.pi / 4)
    raise KeyError(action)


def _background(name: str, xs, ys, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """A static colour/texture field [H, W, 3] float32 in 0..255, with a per-video phase and brightness."""
    m = min(w, h)
    gain = rng.uniform(0.9, 1.1)
    if name == "dusk":  # dark purple at the top to dull orange at the bottom
        t = np.clip(ys / h + rng.uniform(-0.1, 0.1), 0, 1)[..., None]
        img = (1 - t) * np.array([60, 25, 85]) + t * np.array([150, 75, 35])
    elif name == "stripes":  # diagonal dark-green stripes
        period = 0.22 * m
        phase = rng.uniform(0, period)
        on = (((xs + ys + phase) // (period / 2)) % 2)[..., None]
        img = (1 - on) * np.array([25, 75, 35]) + on * np.array([65, 120, 55])
    elif name == "checker":  # slate checkerboard
        cell = 0.2 * m
        ox, oy = rng.uniform(0, cell, size=2)
        on = ((((xs + ox) // cell) + ((ys + oy) // cell)) % 2)[..., None]
        img = (1 - on) * np.array([45, 55, 90]) + on * np.array([95, 105, 140])
    elif name == "static":  # smooth grey value noise
        grid = rng.uniform(40, 140, size=(7, 7))
        gy = np.clip(ys / h * 6, 0, 6 - 1e-6)
        gx = np.clip(xs / w * 6, 0, 6 - 1e-6)
        iy, ix = gy.astype(int), gx.astype(int)
        fy, fx = gy - iy, gx - ix
        v = (grid[iy, ix] * (1 - fx) * (1 - fy) + grid[iy, ix + 1] * fx * (1 - fy)
             + grid[iy + 1, ix] * (1 - fx) * fy + grid[iy + 1, ix + 1] * fx * fy)
        img = np.repeat(v[..., None], 3, axis=2)
    else:
        raise KeyError(name)
    return np.broadcast_to(img * gain, (h, w, 3)).astype(np.float32)


def render_frames(plan: VideoPlan, size: tuple[int, int] = (96, 96)) -> np.ndarray:
    """All frames of one planned video, uint8 [T, H, W, 3] (RGB)."""
    w, h = size
    rng = np.random.default_rng(plan.render_seed)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres
    background = _background(plan.background, xs, ys, w, h, rng)
    jitter = {"dx": rng.uniform(-0.04, 0.04), "dy": rng.uniform(-0.04, 0.04), "scale": rng.uniform(0.9, 1.1)}
    colours = {key: np.array(rgb, dtype=np.float32) for key, _, rgb in ACTIONS}
    outline = max(1.0, 0.025 * min(w, h))
    frames = np.empty((plan.num_frames, h, w, 3), dtype=np.uint8)
    for action, start, end in plan.segments:
        for f in range(start, end):
            u = (f - start) / max(end - start - 1, 1)
            sdf = _glyph_sdf(action, u, xs, ys, w, h, jitter)
            # antialiased dark outline, then the glyph's colour on top
            edge = np.clip(0.5 - (sdf - outline), 0, 1)[..., None]
            fill = np.clip(0.5 - sdf, 0, 1)[..., None]
            img = background * (1 - edge) + np.float32(10.0) * edge
            img = img * (1 - fill) + colours[action] * fill
            frames[f] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return frames


def pick_codec() -> str:
    """libx264 where this FFmpeg build has it (PyAV's wheels do), else MPEG-4 part 2."""
    import av

    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except Exception:  # noqa: BLE001 - PyAV raises different errors across versions for a missing codec
        return "mpeg4"


def write_mp4(path: Path, frames: np.ndarray, fps: int, codec: str | None = None) -> None:
    """Encode uint8 [T, H, W, 3] RGB frames to an mp4 file (written to a temporary name, then renamed)."""
    import av

    codec = codec or pick_codec()
    # no B-frames: decoders seek reliably; a key frame every 2 s keeps random access cheap
    options = {"g": str(2 * fps), "bf": "0"}
    if codec == "libx264":
        options.update(crf="18", preset="medium")
    else:
        options.update(qscale="3")
    path = Path(path)
    tmp = path.with_name(path.stem + ".part.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        if codec != "libx264":
            stream.codec_context.qscale = 3
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def manifest_lines(plans: list[VideoPlan], fps: int) -> list[dict]:
    lines = []
    for p in plans:
        present = {a for a, _, _ in p.segments}
        lines.append({
            "video_id": p.video_id,
            "path": f"{p.video_id}.mp4",
            "split": p.split,
            "labels": {"activity": p.activity, "action": [k for k, _, _ in ACTIONS if k in present]},
            "duration": p.num_frames / fps,
            "segments": [{"label": a, "set": "action", "start": s / fps, "end": e / fps}
                         for a, s, e in p.segments],
            "meta": {"background": p.background},
        })
    return lines


def labels_json(seed: int) -> dict:
    return {
        "dataset": DATASET,
        "default_label_set": "activity",
        "fine_label_set": "action",
        "split_schemes": [SPLIT_SCHEME],
        "label_sets": {
            "activity": {"multi_label": False,
                         "labels": [{"key": k, "name": n} for k, n, _, _ in ACTIVITIES]},
            "action": {"multi_label": True,
                       "labels": [{"key": k, "name": n} for k, n, _ in ACTIONS]},
        },
        "source": f"procedurally rendered by cmdcl_cache.manifest.demo (seed {seed}); "
                  "recipe in manifests/demo/README.md",
        "licence": "MIT (generated data)",
    }


def check_size_fps(size: tuple[int, int], fps: int) -> None:
    w, h = size
    if w < 16 or h < 16 or w % 2 or h % 2:
        raise ValueError(f"size must be even and at least 16x16 (yuv420p), got {w}x{h}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")


def make_demo(out_dir: str | Path, num_videos_per_activity_train: int = 10,
              num_videos_per_activity_val: int = 2, num_videos_per_activity_test: int = 8,
              seed: int = 0, size: tuple[int, int] = (96, 96), fps: int = 8, own_share: float = 0.9,
              codec: str | None = None,
              progress: Callable[[int, int], None] | None = None) -> Path:
    """Render the demo set into `out_dir` and return its manifest folder `<out_dir>/manifest`.

    `progress(done, total)` is called after each video. The manifest is written last, so an interrupted
    run never leaves a manifest that points at missing videos.
    """
    check_size_fps(size, fps)
    plans = plan_demo(seed, num_videos_per_activity_train, num_videos_per_activity_val,
                      num_videos_per_activity_test, fps=fps, own_share=own_share)
    out = Path(out_dir)
    video_dir, manifest_dir = out / "videos", out / "manifest"
    video_dir.mkdir(parents=True, exist_ok=True)
    manifest_dir.mkdir(parents=True, exist_ok=True)
    codec = codec or pick_codec()
    for i, plan in enumerate(plans):
        write_mp4(video_dir / f"{plan.video_id}.mp4", render_frames(plan, size), fps, codec)
        if progress is not None:
            progress(i + 1, len(plans))
    jsonl = "".join(json.dumps(line, sort_keys=False) + "\n" for line in manifest_lines(plans, fps))

    write_atomic(manifest_dir / VIDEOS_FILE, jsonl)
    write_atomic(manifest_dir / LABELS_FILE, json.dumps(labels_json(seed), indent=2) + "\n")
    return manifest_dir
