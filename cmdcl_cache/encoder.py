"""The CLIP encoder: open_clip's model and eval transform, run batched on the device.

`load_encoder(EncoderSpec(...))` builds the model through open_clip's own factory, so the preprocessing
configuration (size, mean/std, interpolation, resize mode) travels with the model exactly as open_clip
sets it. `FrameEncoder.preprocess` then re-implements open_clip's eval transform on uint8 frame tensors
with torch ops on the device (no PIL round trip per frame); the tests check that the features equal
`model.encode_image(preprocess(PIL.Image.fromarray(frame)))` from plain open_clip within float16
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

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as nnf
import torchvision.transforms.functional as TF
from open_clip.transform import center_crop_or_pad
from torchvision.transforms import InterpolationMode

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOKEN_MODES = ("cls", "grid")
# Frames are preprocessed in slices of at most this many pixels, so that a batch of 1080p frames
# does not need gigabytes of float32 on the device at once.
_PIXEL_BUDGET = 1 << 25


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


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise EncoderError(f"device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(f"device {name!r}: CUDA is not available on this machine (use --device cpu)")
    return device


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


class FrameEncoder:
    """One open_clip model on one device: preprocess uint8 frames, encode frames and label texts.

    Build it with `load_encoder(spec)`. Attributes: spec, device, model, tokenizer, feature_dim,
    image_size (int, or (h, w) for a non-square model), mean, std, resize_mode, interpolation,
    fill_color, quick_gelu, pretrained_id ("openai", another tag, "sha256:<hex>" or "none").
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
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise EncoderError(f"model {spec.model!r}: unknown resize_mode {self.resize_mode!r}")
        # open_clip: "bilinear" means bilinear, anything else ("bicubic", "random") bicubic at eval.
        self._interp = (InterpolationMode.BILINEAR if self.interpolation == "bilinear"
                        else InterpolationMode.BICUBIC)
        self._mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        self.feature_dim = int(model.visual.output_dim)
        self._autocast = device.type == "cuda" and spec.precision != "fp32"
        if spec.tokens == "grid":
            self._check_grid_support()

    # ------------------------------------------------------------------------------ preprocessing

    def _keep_ratio_size(self, h: int, w: int, longest: float) -> list[int]:
        # open_clip's ResizeKeepRatio.get_params, without its random (training-only) factors.
        th, tw = self._size
        rh, rw = h / th, w / tw
        ratio = max(rh, rw) * longest + min(rh, rw) * (1.0 - longest)
        return [round(h / ratio), round(w / ratio)]

    def _resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> uint8 [N, 3, th, tw], as open_clip's eval transform does on a PIL image.

        torchvision resizes a uint8 tensor in float and rounds back to uint8, which is what PIL's
        8-bit bicubic (antialiased, a = -0.5) produces too, up to one grey level.
        """
        h, w = x.shape[-2:]
        th, tw = self._size
        resize = dict(interpolation=self._interp, antialias=True)
        if self.resize_mode == "squash":
            return TF.resize(x, [th, tw], **resize)
        if self.resize_mode == "longest":
            x = TF.resize(x, self._keep_ratio_size(h, w, 1.0), **resize)
            return center_crop_or_pad(x, [th, tw], fill=self.fill_color)
        if th == tw:
            # torchvision Resize(int): shortest edge to th, the other int(th * long / short)
            x = TF.resize(x, th, **resize)
        else:
            x = TF.resize(x, self._keep_ratio_size(h, w, 0.0), **resize)
        return TF.center_crop(x, [th, tw])

    def preprocess(self, frames) -> torch.Tensor:
        """uint8 frames [N, H, W, 3] (any device; numpy too) -> float32 [N, 3, S, S] on self.device.

        Exactly open_clip's eval transform for this model (resize with the model's interpolation and
        antialiasing, center crop or pad, /255, normalise with the model's mean and std), batched.
        """
        frames = _as_frames(frames)
        n, h, w, _ = frames.shape
        step = max(1, _PIXEL_BUDGET // max(1, h * w))
        out = []
        for lo in range(0, n, step):
            x = frames[lo:lo + step].to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            x = self._resize_crop(x).float().div_(255)
            out.append(x.sub_(self._mean).div_(self._std))
        return torch.cat(out) if len(out) > 1 else out[0]

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
        """Preprocessed pixels [N, 3, S, S] -> (features float32 [N, D] cpu, tokens [N, P, D] | None).

        Use this to encode one batch gathered from frames of different sizes (preprocess each group).
        """
        pixels = pixels.to(self.device, non_blocking=True)
        with torch.inference_mode(), self._autocast_ctx():
            if self.spec.tokens == "cls":
                return self.model.encode_image(pixels).float().cpu(), None
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
            return pooled.float().cpu(), grid.cpu()

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
            "open_clip_version": open_clip.__version__,
            "torch_version": torch.__version__,
            "quick_gelu": bool(self.quick_gelu),
        }


def load_encoder(spec: EncoderSpec) -> FrameEncoder:
    """Build the model through open_clip's factory (weights from a tag, a checkpoint file, or none)."""
    if spec.precision not in PRECISIONS:
        raise EncoderError(f"precision {spec.precision!r}: expected one of {sorted(PRECISIONS)}")
    if spec.tokens not in TOKEN_MODES:
        raise EncoderError(f"tokens {spec.tokens!r}: expected one of {TOKEN_MODES}")
    model_cfg = open_clip.get_model_config(spec.model)
    if model_cfg is None:
        raise EncoderError(f"model {spec.model!r}: not an open_clip model config "
                           f"(see `python -c 'import open_clip; print(open_clip.list_models())'`)")
    device = _resolve_device(spec.device)

    pretrained = spec.pretrained
    force_quick_gelu = False
    if pretrained is None or str(pretrained).lower() == "none":
        pretrained_arg, pretrained_id = None, "none"
    elif open_clip.get_pretrained_cfg(spec.model, pretrained):
        pretrained_arg, pretrained_id = pretrained, pretrained
        tag_cfg = open_clip.get_pretrained_cfg(spec.model, pretrained)
        # OpenAI weights need QuickGELU; open_clip only warns when the config lacks it.
        force_quick_gelu = bool(tag_cfg.get("quick_gelu")) or pretrained == "openai"
        force_quick_gelu = force_quick_gelu and not model_cfg.get("quick_gelu", False)
    elif Path(pretrained).expanduser().is_file():
        path = Path(pretrained).expanduser().resolve()
        pretrained_arg, pretrained_id = str(path), "sha256:" + file_sha256(path)
    else:
        tags = open_clip.list_pretrained_tags_by_model(spec.model)
        raise EncoderError(f"pretrained {pretrained!r}: neither a checkpoint file nor a known tag for "
                           f"{spec.model!r} (tags: {tags or 'none'}; use 'none' for random weights)")

    try:
        model = open_clip.create_model(spec.model, pretrained=pretrained_arg, precision="fp32",
                                       device=device, force_quick_gelu=force_quick_gelu)
    except RuntimeError as err:
        raise EncoderError(f"model {spec.model!r} with pretrained {pretrained!r}: {err}") from err
    model.eval()
    tokenizer = open_clip.get_tokenizer(spec.model)
    quick_gelu = bool(model_cfg.get("quick_gelu", False) or force_quick_gelu)
    return FrameEncoder(spec, model, tokenizer, device, pretrained_id, quick_gelu)
