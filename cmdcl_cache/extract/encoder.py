"""The CLIP encoder: open_clip's model and eval transform, run batched on the device.

`load_encoder(EncoderSpec(...))` builds the model through open_clip's own factory, so the preprocessing
configuration (size, mean/std, interpolation, resize mode) travels with the model exactly as open_clip
sets it. `FrameEncoder.preprocess` applies open_clip's eval transform to uint8 frames: the resize and
crop with PIL itself on CPU (`transform.resize_crop`, torch-free, which the extract pipeline runs in its
decode workers) or with `pil_resize` on the device, a batched re-implementation of PIL's fixed-point
resampling that gives the same bytes; then /255 and mean/std on the device (`normalise_crops` does only
this part, for crops made elsewhere). The tests check that the pixels equal open_clip's
`preprocess(PIL.Image.fromarray(frame))` exactly and the features equal plain open_clip's within float16
tolerance.

Precision: the model's weights stay float32 and, on CUDA, the towers run under
`torch.autocast(dtype=float16|bfloat16)`, which is how open_clip's README runs inference. (open_clip's
`precision="fp16"` instead casts the weights to half, OpenAI style; we keep fp32 weights so that autocast
keeps LayerNorm and softmax in float32.) On CPU everything is computed in float32: the cache stores
float16 anyway, and CPU half kernels are slow or missing.

QuickGELU: OpenAI's weights (and some others) were trained with QuickGELU, while open_clip's plain
configs (`ViT-B-16`) use GELU. When the pretrained tag says so we pass `force_quick_gelu=True`, which
gives the same network as the `-quickgelu` config, and record `quick_gelu` in the provenance. A checkpoint
file says nothing about its activation: name the `-quickgelu` model when the file needs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import PIL.Image
import torch
import torch.nn.functional as nnf
import torchvision.transforms.functional as TF
from open_clip.transform import center_crop_or_pad

from cmdcl_cache.device import resolve_device
from cmdcl_cache.extract.transform import TransformSpec, plan, resize_crop
from cmdcl_cache.files import file_sha256

MODEL_CONFIG_DIR = resources.files("cmdcl_cache") / "model_configs"  # package data
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOKEN_MODES = ("cls", "grid")
# Frames are preprocessed in slices of at most this many pixels, so that a batch of 1080p frames
# does not need gigabytes of float64 on the device at once.
_PIXEL_BUDGET = 1 << 23


def _register_model_configs() -> None:
    # Idempotent: open_clip rescans its config paths, and a path already listed is not added again.
    if "cmdcl-tiny" not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


_register_model_configs()


class EncoderError(ValueError):
    """The encoder spec names something that cannot be built (model, weights, precision, tokens)."""


@dataclass
class EncoderSpec:
    model: str = "ViT-B-16"
    pretrained: str = "openai"  # "openai" | other open_clip tag | path to a checkpoint file | "none"
    precision: str = "fp16"     # fp32 | fp16 | bf16 (autocast on cuda; on cpu computed in fp32)
    device: str = "auto"        # auto | cpu | cuda | cuda:N
    tokens: str = "cls"         # "cls": one feature per frame; "grid": also a pooled patch grid
    grid: int = 4               # side of the pooled patch grid when tokens == "grid"

    @classmethod
    def of(cls, cache_spec, device: str = "auto") -> "EncoderSpec":
        """The encoder that makes (or made) a cache of `cache_spec` (a CacheSpec), on `device`."""
        return cls(model=cache_spec.model, pretrained=cache_spec.pretrained, precision=cache_spec.precision,
                   device=device, tokens=cache_spec.tokens, grid=cache_spec.grid)


def _as_frames(frames) -> torch.Tensor:
    """uint8 [N, H, W, 3] tensor from a tensor or a numpy array (decord's .asnumpy())."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a uint8 tensor or array [N, H, W, 3], got {type(frames).__name__}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    return frames


_PRECISION_BITS = 32 - 8 - 2


def _bicubic(x: np.ndarray) -> np.ndarray:
    a, x = -0.5, np.abs(x)
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
                    np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}


@lru_cache(maxsize=256)
def _pil_weights_np(in_size: int, out_size: int, interpolation: str) -> np.ndarray:
    """PIL's fixed-point resampling weights, [out_size, in_size] (precompute_coeffs + normalize_coeffs_8bpc)."""
    fn, support = _FILTERS["bilinear" if interpolation == "bilinear" else "bicubic"]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)   # C casts truncate toward zero, as int() does
        xmax = min(int(center + support + 0.5), in_size)
        k = fn((np.arange(xmin, xmax) - center + 0.5) / filterscale)
        total = k.sum()
        if total != 0.0:
            k = k / total
        weights[xx, xmin:xmax] = np.trunc(k * (1 << _PRECISION_BITS) + np.where(k < 0, -0.5, 0.5))
    return weights


_BLOCK = 16  # output pixels per banded matmul: each block reads only the input band its weights touch


@lru_cache(maxsize=512)
def _pil_blocks(in_size: int, out_size: int, out_lo: int, out_hi: int, interpolation: str,
                device: str) -> list[tuple[int, int, int, int, torch.Tensor]]:
    """Weights of outputs [out_lo, out_hi) in blocks: (o0, o1, in_lo, in_hi, float64 [o1-o0, in_hi-in_lo])."""
    weights = _pil_weights_np(in_size, out_size, interpolation)
    blocks = []
    for o0 in range(out_lo, out_hi, _BLOCK):
        o1 = min(o0 + _BLOCK, out_hi)
        cols = np.flatnonzero(np.any(weights[o0:o1] != 0, axis=0))
        lo, hi = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 1)
        blocks.append((o0, o1, lo, hi, torch.from_numpy(weights[o0:o1, lo:hi].copy()).to(device)))
    return blocks


def _pil_round(x: torch.Tensor) -> torch.Tensor:
    # PIL: ss = 2**(bits-1) + sum(pixel * weight); uint8 = clip(ss >> bits, 0, 255)
    return torch.floor((x + (1 << (_PRECISION_BITS - 1))) / (1 << _PRECISION_BITS)).clamp_(0, 255)


def _input_band(in_size: int, out_size: int, out_lo: int, out_hi: int, interpolation: str) -> tuple[int, int]:
    if in_size == out_size:
        return out_lo, out_hi
    blocks = _pil_blocks(in_size, out_size, out_lo, out_hi, interpolation, "cpu")
    return min(b[2] for b in blocks), max(b[3] for b in blocks)


def _resample_axis(x: torch.Tensor, axis: int, in_offset: int, in_size: int, out_size: int,
                   out_lo: int, out_hi: int, interpolation: str) -> torch.Tensor:
    """One PIL pass along axis (-1 or -2) for outputs [out_lo, out_hi); x holds inputs from in_offset."""
    blocks = _pil_blocks(in_size, out_size, out_lo, out_hi, interpolation, str(x.device))
    parts = []
    for _, _, lo, hi, k in blocks:
        if axis == -1:
            parts.append(x[..., lo - in_offset:hi - in_offset] @ k.T)
        else:
            parts.append(k @ x[..., lo - in_offset:hi - in_offset, :])
    return _pil_round(torch.cat(parts, dim=axis))


def pil_resize(x: torch.Tensor, size: Sequence[int], interpolation: str = "bicubic",
               crop: tuple[int, int, int, int] | None = None, order: str = "hv") -> torch.Tensor:
    """Resize [N, C, H, W] uint8 images to size (h, w) exactly as PIL's Image.resize does for 8-bit
    images, then keep the window crop = (top, left, height, width) of the result (which must lie inside
    it); returns float64 holding the uint8 values, on x's device. Only the cropped outputs are computed,
    from only the input rows and columns they read, as PIL itself does for its vertical pass.

    order: "hv" (horizontal pass first) or "vh". Pillow picks the order itself, by a rule that is not
    documented (horizontal first for every proportional resize we tried, vertical first for some
    resizes that shrink the height much more than the width); `FrameEncoder` finds it per frame size
    by checking against PIL once (`resize_order`)."""
    oh, ow = int(size[0]), int(size[1])
    h, w = x.shape[-2:]
    top, left, ch, cw = crop if crop is not None else (0, 0, oh, ow)
    if not (0 <= top and top + ch <= oh and 0 <= left and left + cw <= ow):
        raise ValueError(f"crop {crop} does not lie inside the resized size {(oh, ow)}")
    # Rows the vertical pass reads, columns the horizontal pass reads.
    r0, r1 = _input_band(h, oh, top, top + ch, interpolation)
    c0, c1 = _input_band(w, ow, left, left + cw, interpolation)
    x = x[..., r0:r1, c0:c1].to(torch.float64)
    for axis in order:
        if axis == "h" and ow != w:  # PIL skips a pass whose size does not change
            x = _resample_axis(x, -1, c0, w, ow, left, left + cw, interpolation)
        elif axis == "v" and oh != h:
            x = _resample_axis(x, -2, r0, h, oh, top, top + ch, interpolation)
    return x


@lru_cache(maxsize=1024)
def resize_order(h: int, w: int, oh: int, ow: int, interpolation: str) -> str | None:
    """The pass order ("hv" or "vh") with which `pil_resize` reproduces PIL for this resize, found on a
    noise image (on which the orders differ); None if neither does (then resize with PIL itself)."""
    noise = np.random.default_rng(h * 100003 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    resample = PIL.Image.BILINEAR if interpolation == "bilinear" else PIL.Image.BICUBIC
    expected = torch.from_numpy(np.asarray(PIL.Image.fromarray(noise).resize((ow, oh), resample)).copy())
    x = torch.from_numpy(noise).permute(2, 0, 1)[None]
    for order in ("hv", "vh"):
        if torch.equal(pil_resize(x, (oh, ow), interpolation, order=order)[0].permute(1, 2, 0),
                       expected.to(torch.float64)):
            return order
    return None


class PendingFeatures:
    """Features being computed on the device: a non-blocking copy into pinned host memory and a CUDA event."""

    def __init__(self, features: torch.Tensor, tokens: torch.Tensor | None):
        self._event = None
        if features.device.type == "cuda":
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) if t is not None else None
                    for t in (features, tokens)]
            for h, t in zip(host, (features, tokens)):
                if t is not None:
                    h.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            features, tokens = host
        self._features, self._tokens = features, tokens

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._event is not None:
            self._event.synchronize()   # the only wait: when the caller needs the numbers
        return self._features, self._tokens


class FrameEncoder:
    """One open_clip model on one device: preprocess uint8 frames, encode frames and label texts.

    Build it with `load_encoder(spec)`. Attributes: spec, device, model, tokenizer, feature_dim,
    image_size (int, or (h, w) for a non-square model), mean, std, resize_mode, interpolation,
    fill_color, quick_gelu, pretrained_id ("openai", another tag, "sha256:<hex>" or "none"),
    resize_backend ("pil" on CPU, "torch" elsewhere; settable, both are exact).
    """

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, tokenizer, device: torch.device,
                 pretrained_id: str, quick_gelu: bool):
        self.spec, self.model, self.tokenizer, self.device = spec, model, tokenizer, device
        self.pretrained_id, self.quick_gelu = pretrained_id, quick_gelu
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg["size"]
        self._size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        self.image_size = self._size[0] if self._size[0] == self._size[1] else self._size
        self.mean = tuple(float(m) for m in cfg["mean"])
        self.std = tuple(float(s) for s in cfg["std"])
        self.resize_mode = cfg.get("resize_mode", "shortest")
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.fill_color = int(cfg.get("fill_color", 0))
        try:
            self.transform_spec = TransformSpec(self._size, self.resize_mode, self.interpolation,
                                                self.fill_color)
        except ValueError as err:
            raise EncoderError(f"model {spec.model!r}: {err}") from None
        self._mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        self.feature_dim = int(model.visual.output_dim)
        self._autocast = device.type == "cuda" and spec.precision != "fp32"
        # Both backends give the same bytes; PIL is faster on CPU, torch keeps the CPU free on a GPU.
        self.resize_backend = "pil" if device.type == "cpu" else "torch"
        if spec.tokens == "grid":
            self._check_grid_support()

    # ------------------------------------------------------------------------------ preprocessing

    def _plan(self, h: int, w: int) -> tuple[list[int], str, tuple | None]:
        return plan(self.transform_spec, h, w)

    def _crop_or_pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize_mode == "longest":
            return center_crop_or_pad(x, list(self._size), fill=self.fill_color)
        return TF.center_crop(x, list(self._size))  # pads with zeros, as torchvision's CenterCrop

    def _resize_crop_torch(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] on the device -> [N, 3, th, tw] holding the uint8 values PIL makes."""
        size, interp, box = self._plan(*x.shape[-2:])
        order = resize_order(*x.shape[-2:], *size, interp)
        if order is None:  # no known pass order reproduces PIL here: let PIL do it
            return self._resize_crop_pil(x.permute(0, 2, 3, 1)).to(x.device)
        if box is None:
            return self._crop_or_pad(pil_resize(x, size, interp, order=order))
        return pil_resize(x, size, interp, crop=box, order=order)

    def _resize_crop_pil(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> uint8 [N, 3, th, tw] through PIL itself (transform.resize_crop, the
        reference, and what the decode workers run)."""
        crops = resize_crop(self.transform_spec, frames.cpu().numpy())
        return torch.from_numpy(crops).permute(0, 3, 1, 2)

    def preprocess(self, frames) -> torch.Tensor:
        """uint8 frames [N, H, W, 3] (any device; numpy too) -> float32 [N, 3, S, S] on self.device.

        Exactly open_clip's eval transform for this model: resize as PIL does (its 8-bit fixed-point
        resampling with the model's interpolation), center crop (or pad, for resize_mode 'longest'),
        /255, normalise with the model's mean and std. On CUDA the resize runs batched on the GPU
        (`pil_resize`, bit-identical to PIL); on CPU PIL itself is the fastest exact way.
        """
        frames = _as_frames(frames)
        n, h, w, _ = frames.shape
        step = max(1, _PIXEL_BUDGET // max(1, h * w))
        out = []
        for lo in range(0, n, step):
            if self.resize_backend == "pil":
                x = self._resize_crop_pil(frames[lo:lo + step]).to(self.device)
            else:
                x = frames[lo:lo + step].to(self.device, non_blocking=True).permute(0, 3, 1, 2)
                x = self._resize_crop_torch(x)
            out.append(self._normalise(x))
        return torch.cat(out) if len(out) > 1 else out[0]

    def resize_crop(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames [N, H, W, 3] on the device -> uint8 crops [N, th, tw, 3] there, the bytes
        `transform.resize_crop` (PIL) gives: the NVDEC decode threads crop with it, then
        `normalise_crops` takes the crops as it takes the CPU workers'."""
        x = self._resize_crop_torch(frames.permute(0, 3, 1, 2))
        return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        # uint8 values [N, 3, S, S] on the device (uint8, or float64 from pil_resize) -> as ToTensor
        # (float32, then / 255), then Normalize. Strides are kept: [N, S, S, 3] crops permuted stay
        # channels-last, as the PIL path has always given them.
        x = x.float().div_(255)
        return x.sub_(self._mean).div_(self._std)

    def normalise_crops(self, crops) -> torch.Tensor:
        """uint8 crops [N, th, tw, 3] from `transform.resize_crop(self.transform_spec, frames)` (numpy or
        tensor, as the decode workers send them) -> float32 [N, 3, th, tw] on self.device, equal to
        `preprocess(frames)` bit for bit: the same values go through the same /255 and normalisation."""
        crops = _as_frames(crops)
        if tuple(crops.shape[1:3]) != self._size:
            raise ValueError(f"crops must be [N, {self._size[0]}, {self._size[1]}, 3] (the model's input "
                             f"size), got {tuple(crops.shape)}")
        return self._normalise(crops.to(self.device, non_blocking=True).permute(0, 3, 1, 2))

    # ---------------------------------------------------------------------------------- encoding

    def _check_grid_support(self) -> None:
        from open_clip.transformer import VisionTransformer
        visual = self.model.visual
        if not isinstance(visual, VisionTransformer):
            raise EncoderError(f"model {self.spec.model!r}: --tokens grid needs an open_clip ViT image "
                               f"tower, this one is {type(visual).__name__}")
        if visual.attn_pool is not None or visual.pool_type == "none":
            raise EncoderError(f"model {self.spec.model!r}: --tokens grid is not supported for image "
                               "towers with attentional pooling (their tokens are not a patch grid)")
        if self.spec.grid < 1 or self.spec.grid > min(visual.grid_size):
            raise EncoderError(f"grid {self.spec.grid}: must be between 1 and the patch grid "
                               f"{visual.grid_size} of {self.spec.model!r}")

    def _autocast_ctx(self):
        return torch.autocast(device_type=self.device.type, dtype=PRECISIONS[self.spec.precision],
                              enabled=self._autocast)

    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Preprocessed pixels [N, 3, S, S] (from frames of any sizes) -> (features float32 [N, D] cpu,
        tokens [N, P, D] | None)."""
        return self.encode_pixels_async(pixels).result()

    def encode_pixels_async(self, pixels: torch.Tensor) -> "PendingFeatures":
        """Start encoding; `.result()` gives what `encode_pixels` returns. On CUDA the features are copied into
        pinned host memory without blocking, so the caller can go on (receive the next frames) while the
        device computes; on the CPU the work is done when this returns."""
        pixels = pixels.to(self.device, non_blocking=True)
        with torch.inference_mode(), self._autocast_ctx():
            if self.spec.tokens == "cls":
                return PendingFeatures(self.model.encode_image(pixels).float(), None)
            visual = self.model.visual
            # With output_tokens set, the ViT returns (pooled @ proj, patch tokens after ln_post);
            # pooled is what encode_image returns.
            visual.output_tokens = True
            try:
                pooled, tokens = visual(pixels)
            finally:
                visual.output_tokens = False
            if visual.final_ln_after_pool:
                tokens = visual.ln_post(tokens)  # such towers skip ln_post on the tokens
            n, l, width = tokens.shape
            gh, gw = visual.grid_size
            grid = tokens.float().transpose(1, 2).reshape(n, width, gh, gw)
            # Pool then project: the projection is linear, so this equals projecting then pooling.
            grid = nnf.adaptive_avg_pool2d(grid, self.spec.grid).flatten(2).transpose(1, 2)
            grid = grid @ visual.proj.float()
            return PendingFeatures(pooled.float(), grid)

    def encode_batch(self, crops: np.ndarray, size: int) -> "PendingFeatures":
        """Start encoding uint8 crops [k, S, S, 3] (k <= size) as one batch of exactly `size` rows, zero-padded;
        rows past k of the result are padding. A frame's feature must not depend on how many frames share its
        batch (GEMM kernels differ with the row count): byte-identical resumes rely on this."""
        pixels = self.normalise_crops(crops)
        if len(pixels) < size:
            pixels = torch.cat([pixels, pixels.new_zeros((size - len(pixels), *pixels.shape[1:]))])
        return self.encode_pixels_async(pixels)

    def encode_frames(self, frames) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 frames [N, H, W, 3] -> (features float32 [N, D] on cpu, grid tokens [N, P, D] | None).

        Features are what `model.encode_image` returns: projected, not normalised. A list of frame
        arrays of different sizes is accepted too (each preprocessed on its own, encoded together).
        """
        if isinstance(frames, (list, tuple)):
            pixels = torch.cat([self.preprocess(f) for f in frames])
        else:
            pixels = self.preprocess(frames)
        return self.encode_pixels(pixels)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Texts -> float32 [N, D] on cpu, as `model.encode_text` returns them (not normalised)."""
        texts = list(texts)
        out = []
        with torch.inference_mode(), self._autocast_ctx():
            for lo in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[lo:lo + batch_size]).to(self.device)
                out.append(self.model.encode_text(tokens).float().cpu())
        dim = self.feature_dim
        return torch.cat(out) if out else torch.zeros(0, dim)

    # -------------------------------------------------------------------------------- provenance

    def provenance(self) -> dict:
        """What a cache must record so that features from two runs are known to be comparable."""
        return {
            "model": self.spec.model,
            "pretrained": self.pretrained_id,
            "precision": self.spec.precision,
            "image_size": self.image_size if isinstance(self.image_size, int) else list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "resize_mode": self.resize_mode,
            "interpolation": self.interpolation,
            "tokens": self.spec.tokens,
            # grid means nothing without grid tokens; 0 keeps cls caches comparable whatever --grid was
            "grid": int(self.spec.grid) if self.spec.tokens == "grid" else 0,
            # plain str: torch.__version__ is a str subclass that HDF5 attributes cannot hold
            "open_clip_version": str(open_clip.__version__),
            "torch_version": str(torch.__version__),
            "quick_gelu": bool(self.quick_gelu),
        }


def _cached_weights(tag_cfg: dict) -> bool:
    """Whether open_clip would find these weights without a download (hub cache, or its URL cache)."""
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache
        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(repo, n), str) for n in names):
            return True
    url = tag_cfg.get("url", "")
    return bool(url) and (Path.home() / ".cache" / "clip" / os.path.basename(url)).exists()


def _online(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_weights_reachable(model: str, tag: str, tag_cfg: dict) -> None:
    """Fail in seconds, saying what to do, when the weights are neither cached nor downloadable: offline
    (HF_HUB_OFFLINE set, or no route to the hub), the hub client would otherwise retry for about a minute."""
    if _cached_weights(tag_cfg):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or not _online():
        why = "HF_HUB_OFFLINE is set" if offline else "huggingface.co cannot be reached"
        raise EncoderError(f"weights {tag!r} of {model!r} are not in the local cache and {why}: download them "
                           f"once where there is a network (`python -c \"import open_clip; open_clip.create_model("
                           f"'{model}', pretrained='{tag}')\"`), pass a checkpoint file with --pretrained PATH, "
                           "or try the pipeline with --model cmdcl-tiny --pretrained none (random weights)")


def check_encoder_spec(spec: EncoderSpec) -> tuple[str | None, str, bool]:
    """Validate the spec without building anything: (pretrained argument for open_clip, the id recorded in
    the provenance, force QuickGELU). Raises EncoderError naming what is wrong, within milliseconds, so that
    `extract` can refuse a typo before it creates a folder or waits on a download."""
    if spec.precision not in PRECISIONS:
        raise EncoderError(f"precision {spec.precision!r}: expected one of {sorted(PRECISIONS)}")
    if spec.tokens not in TOKEN_MODES:
        raise EncoderError(f"tokens {spec.tokens!r}: expected one of {TOKEN_MODES}")
    model_cfg = open_clip.get_model_config(spec.model)
    if model_cfg is None:
        import difflib
        close = difflib.get_close_matches(spec.model, open_clip.list_models(), n=5, cutoff=0.6)
        raise EncoderError(f"model {spec.model!r}: not an open_clip model config"
                           + (f" (similar: {', '.join(close)})" if close else "")
                           + "; `python -c 'import open_clip; print(open_clip.list_models())'` lists them all, "
                             "and cmdcl-tiny is a small random-weight model for a try-out")
    pretrained = spec.pretrained
    if pretrained is None or str(pretrained).lower() == "none":
        return None, "none", False
    tag_cfg = open_clip.get_pretrained_cfg(spec.model, pretrained)
    if tag_cfg:
        check_weights_reachable(spec.model, pretrained, tag_cfg)
        # OpenAI weights need QuickGELU; open_clip only warns when the config lacks it.
        quick = (bool(tag_cfg.get("quick_gelu")) or pretrained == "openai") and not model_cfg.get("quick_gelu", False)
        return pretrained, pretrained, quick
    path = Path(pretrained).expanduser()
    if path.is_file():
        path = path.resolve()
        return str(path), "sha256:" + file_sha256(path), False
    tags = open_clip.list_pretrained_tags_by_model(spec.model)
    raise EncoderError(f"pretrained {pretrained!r}: neither a checkpoint file nor a known tag for "
                       f"{spec.model!r} (tags: {', '.join(tags) or 'none'}; 'none' for random weights)")


@contextlib.contextmanager
def _quiet_if(quiet: bool):
    """open_clip warns that no weights were loaded: with `pretrained none` that is what was asked for."""
    logger = logging.getLogger()
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_encoder(spec: EncoderSpec, seed: int | None = 0) -> FrameEncoder:
    """Build the model through open_clip's factory (weights from a tag, a checkpoint file, or none).

    Random weights (`pretrained none`) are drawn with torch's global seed fixed to `seed` (restored
    afterwards), so that two runs, and a run and its resumption, build the same network."""
    pretrained_arg, pretrained_id, force_quick_gelu = check_encoder_spec(spec)
    model_cfg = open_clip.get_model_config(spec.model)
    device = resolve_device(spec.device)
    try:
        with torch.random.fork_rng(devices=[]), _quiet_if(pretrained_arg is None):
            if seed is not None:
                torch.manual_seed(seed)
            model = open_clip.create_model(spec.model, pretrained=pretrained_arg, precision="fp32",
                                           device=device, force_quick_gelu=force_quick_gelu)
    except Exception as err:   # a corrupt or foreign checkpoint, an unpickling refusal, a failed download
        raise EncoderError(f"model {spec.model!r} with pretrained {spec.pretrained!r} cannot be loaded: "
                           f"{type(err).__name__}: {' '.join(str(err).split())[:400]}") from None
    model.eval()
    tokenizer = open_clip.get_tokenizer(spec.model)
    quick_gelu = bool(model_cfg.get("quick_gelu", False) or force_quick_gelu)
    return FrameEncoder(spec, model, tokenizer, device, pretrained_id, quick_gelu)
