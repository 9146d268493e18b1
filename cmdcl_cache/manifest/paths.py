"""Find a manifest record's video file under --video-root.

A record's `path` is relative to the video root and may be a stem without extension (COIN ids, Breakfast
names): the extension is resolved here, among VIDEO_EXTENSIONS. Rules, in order:

1. `path` with a video extension names exactly one file.
2. `<root>/<path>.<ext>` for any video extension.
3. Only for a bare stem (no `/`, e.g. COIN): `<root>/<folder>/<stem>.<ext>`, one folder deep, which is the
   COIN layout by task folder.
4. Steps 1-3 again for each of `meta["path_alternatives"]` (Breakfast stereo videos, see
   cmdcl_cache/manifest/builders/breakfast.py), in order, when the main path found nothing.

More than one match at the first step that matches is *ambiguous* (e.g. `id.mp4` and `id.mkv`, or the same
id in two task folders) and is an error: picking one silently would make caches differ between machines.

`VideoIndex` walks the tree once, so that checking 11,827 videos costs one directory walk, not 11,827 globs.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path, PurePosixPath

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv",
                    ".3gp", ".ogv", ".ts")


class VideoPathError(FileNotFoundError):
    """A record whose video is missing or ambiguous. `kind` is "missing" or "ambiguous"."""

    def __init__(self, video_id: str, path: str, root, kind: str, candidates=()):
        self.video_id, self.path, self.root, self.kind = video_id, path, Path(root), kind
        self.candidates = [str(c) for c in candidates]
        if kind == "missing":
            msg = (f"video {video_id!r}: no file for path {path!r} under {root} "
                   f"(tried extensions {' '.join(VIDEO_EXTENSIONS)})")
        else:
            msg = f"video {video_id!r}: path {path!r} is ambiguous under {root}: {', '.join(self.candidates)}"
        super().__init__(msg)


def _has_video_ext(path: str) -> bool:
    return PurePosixPath(path).suffix.lower() in VIDEO_EXTENSIONS


class VideoIndex:
    """Every video file under `root`, keyed by its relative path without extension. One walk of the tree."""

    def __init__(self, root):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"video root {self.root} is not a folder")
        self.by_stem_path: dict[str, list[str]] = defaultdict(list)  # "P03/cam01/P03_cereals" -> [rel, ...]
        self.files: set[str] = set()
        seen: set[tuple[int, int]] = set()   # folders already walked: a symlink loop is walked once
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:
                dirnames[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            prefix = "" if rel_dir == "." else rel_dir + "/"
            for name in sorted(filenames):
                rel = prefix + name
                if not _has_video_ext(name):
                    continue
                self.files.add(rel)
                self.by_stem_path[rel[: -len(PurePosixPath(name).suffix)]].append(rel)

    def _candidates(self, path: str) -> list[str]:
        if _has_video_ext(path):
            return [path] if path in self.files else []
        found = list(self.by_stem_path.get(path, ()))
        if found or "/" in path:
            return found
        return [rel for key, rels in self._one_deep().get(path, {}).items() for rel in rels]

    def _one_deep(self) -> dict[str, dict[str, list[str]]]:
        # stem -> {folder/stem: [rel, ...]} for files exactly one folder deep; built on first use
        if not hasattr(self, "_deep"):
            deep: dict[str, dict[str, list[str]]] = defaultdict(dict)
            for key, rels in self.by_stem_path.items():
                parts = key.split("/")
                if len(parts) == 2:
                    deep[parts[1]][key] = rels
            self._deep = deep
        return self._deep

    def resolve(self, record) -> Path:
        return _resolve(record, self.root, self._candidates)


def build_video_index(video_root) -> VideoIndex:
    return VideoIndex(video_root)


def _glob_candidates(root: Path):
    def candidates(path: str) -> list[str]:
        if _has_video_ext(path):
            return [path] if (root / path).is_file() else []
        patterns = [path + ".*"] if "/" in path else [path + ".*", "*/" + path + ".*"]
        for pattern in patterns:
            found = sorted(p.relative_to(root).as_posix() for p in root.glob(pattern)
                           if p.is_file() and _has_video_ext(p.name) and p.name[: -len(p.suffix)] ==
                           PurePosixPath(path).name)
            if found:
                return found
        return []
    return candidates


def _resolve(record, root: Path, candidates) -> Path:
    tried = [record.path] + list((record.meta or {}).get("path_alternatives", []))
    for path in tried:
        found = candidates(path)
        if len(found) == 1:
            return root / found[0]
        if len(found) > 1:
            raise VideoPathError(record.video_id, path, root, "ambiguous", found)
    raise VideoPathError(record.video_id, " or ".join(tried), root, "missing")


def resolve_video_path(record, video_root, index: VideoIndex | None = None) -> Path:
    """Path of `record`'s video under `video_root`; raises VideoPathError (missing / ambiguous).

    Pass `index` (from build_video_index) when resolving many records; without it, each call globs.
    """
    if index is not None:
        return index.resolve(record)
    root = Path(video_root)
    return _resolve(record, root, _glob_candidates(root))


def check_videos(videos, video_root) -> dict[str, list]:
    """Resolve every record with one index: {"found": [(id, Path)], "missing": [id], "ambiguous": [(id, [rel])]}."""
    index = build_video_index(video_root)
    out: dict[str, list] = {"found": [], "missing": [], "ambiguous": []}
    for rec in videos:
        try:
            out["found"].append((rec.video_id, index.resolve(rec)))
        except VideoPathError as e:
            if e.kind == "missing":
                out["missing"].append(rec.video_id)
            else:
                out["ambiguous"].append((rec.video_id, e.candidates))
    return out
