"""open_clip's eval resize + centre crop on uint8 frames, with PIL itself; numpy and PIL only.

This is the geometric half of open_clip's eval transform (`image_transform_v2(cfg, is_train=False)`):
resize (shortest edge, longest edge, or squash; bicubic or bilinear, as the model's preprocess_cfg says),
then centre crop (or pad). The other half, /255 and mean/std normalisation, needs no knowledge of the
frame and runs on the device (`FrameEncoder.normalise_crops`).

It lives apart from encoder.py because the decode workers run it: they must not import torch (spawn
start-up time and memory per worker). The encoder's CPU path calls the same `resize_crop`, so the
pixels the pipeline encodes and those `FrameEncoder.preprocess` gives come from one implementation; the
encoder's CUDA path (`pil_resize`) reproduces it bit for bit and is tested against it.

PIL is the reference, not an approximation: open_clip hands PIL images to torchvision's Resize, which
calls `PIL.Image.resize`, and torchvision's CenterCrop / open_clip's CenterCropOrPad, whose offsets and
padding `crop_or_pad` repeats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import PIL.Image

RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")


@dataclass(frozen=True)
class TransformSpec:
    """What the eval transform needs to know: picklable, so the decode workers get it from the encoder."""
    size: tuple[int, int]        # (height, width) of the model's input
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    fill_color: int = 0          # padding value of resize_mode 'longest' (open_clip's fill_color)

    def __post_init__(self):
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r}: expected one of {RESIZE_MODES}")
        if self.interpolation not in INTERPOLATIONS:
            # open_clip's eval transform knows bicubic, bilinear and (timm only) random; frames need one of two
            raise ValueError(f"interpolation {self.interpolation!r}: expected one of {INTERPOLATIONS}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TransformSpec":
        return cls(**{**d, "size": tuple(d["size"])})


def shortest_edge_size(h: int, w: int, size: int) -> list[int]:
    """The (h, w) that torchvision's Resize(size: int) gives: shortest edge to size, truncating."""
    if w <= h:
        return [int(size * h / w), size]
    return [size, int(size * w / h)]


def keep_ratio_size(h: int, w: int, target: tuple[int, int], longest: float) -> list[int]:
    """open_clip's ResizeKeepRatio.get_params without its random (training-only) factors."""
    th, tw = target
    rh, rw = h / th, w / tw
    ratio = max(rh, rw) * longest + min(rh, rw) * (1.0 - longest)
    return [round(h / ratio), round(w / ratio)]


def center_crop_box(size, crop) -> tuple[int, int, int, int] | None:
    """torchvision's center_crop offsets (top, left, h, w); None when the crop would need padding."""
    (h, w), (ch, cw) = size, crop
    if ch > h or cw > w:
        return None
    return int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0)), ch, cw


def plan(spec: TransformSpec, h: int, w: int) -> tuple[list[int], str, tuple | None]:
    """(resized (h, w), interpolation, crop box or None) of open_clip's eval transform for an h x w
    frame; None means: centre crop or pad the resized image to spec.size."""
    th, tw = spec.size
    if spec.resize_mode == "squash":
        return [th, tw], spec.interpolation, (0, 0, th, tw)
    if spec.resize_mode == "longest":
        return keep_ratio_size(h, w, spec.size, 1.0), spec.interpolation, None
    if th == tw:
        size, interp = shortest_edge_size(h, w, th), spec.interpolation
    else:
        # open_clip builds ResizeKeepRatio(size) here with its default interpolation, bicubic
        size, interp = keep_ratio_size(h, w, spec.size, 0.0), "bicubic"
    return size, interp, center_crop_box(size, spec.size)


def crop_or_pad(x: np.ndarray, crop: tuple[int, int], fill: int = 0) -> np.ndarray:
    """[N, H, W, C] -> [N, ch, cw, C]: torchvision's center_crop (fill 0) / open_clip's center_crop_or_pad
    (fill_color): pad to at least the crop, (extra // 2) before and the rest after, then crop centred."""
    ch, cw = crop
    h, w = x.shape[1:3]
    if ch > h or cw > w:
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)),
                   constant_values=fill)
        h, w = x.shape[1:3]
        if (h, w) == (ch, cw):
            return x
    top, left, _, _ = center_crop_box((h, w), crop)
    return x[:, top:top + ch, left:left + cw]


def resize_crop(spec: TransformSpec, frames: np.ndarray) -> np.ndarray:
    """uint8 RGB frames [N, H, W, 3] -> uint8 [N, th, tw, 3]: open_clip's eval resize and crop, by PIL."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
    th, tw = spec.size
    if len(frames) == 0:
        return np.zeros((0, th, tw, 3), np.uint8)
    size, interp, box = plan(spec, *frames.shape[1:3])
    resample = PIL.Image.BILINEAR if interp == "bilinear" else PIL.Image.BICUBIC
    out = np.empty((len(frames), *size, 3), np.uint8) if box is None else np.empty((len(frames), th, tw, 3), np.uint8)
    for i, a in enumerate(frames):
        x = np.asarray(PIL.Image.fromarray(a).resize((size[1], size[0]), resample))
        if box is None:
            out[i] = x
        else:
            top, left, ch, cw = box
            out[i] = x[top:top + ch, left:left + cw]
    if box is None:
        fill = spec.fill_color if spec.resize_mode == "longest" else 0  # CenterCrop pads with 0
        out = np.ascontiguousarray(crop_or_pad(out, spec.size, fill))
    return out
