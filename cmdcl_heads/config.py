"""The two configurations of a run: the head's (architecture and switches) and the training's.

Both are frozen dataclasses whose fields are the `cmdcl-heads train` flags (cmdcl_cache.config builds the
command from them), so each default and help text is written once, here. A run folder's `config.toml`
holds both, resolved, and `--config` reads it back. Fields marked `cli=False` are shapes the trainer
derives from the data (feature dimension, number of classes, dictionary sizes); they are stored in
checkpoints so that a head can be rebuilt from its configuration alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from cmdcl_cache.config import check_choices, from_dict, option

MEDIATOR_MODES = ("gate", "replace", "project")
CROSS_SAMPLE_MODES = ("attend", "backdoor")
APPROXIMATORS = ("text", "dictionary")
MODELS = ("zeroshot", "linear", "text4vis", "cmdcl")
# what --reweight-strata and --static-removal did outside our own study (docs/causal-heads.md)
HELD_OUT_WORLD = ("On a held-out world not in this repository, run through the CLI on what landed, no causal "
                  "variant met the study's target: --reweight-strata 20 gained 5 points shifted at a 16-point "
                  "loss in distribution, and --static-removal 1 dropped in-distribution accuracy to chance "
                  "(14 % against text4vis's 87 %).")


@dataclass(frozen=True)
class HeadConfig:
    model: Literal["zeroshot", "linear", "text4vis", "cmdcl"] = option("cmdcl", "Head to train.")
    frames: int = option(16, "T frames sampled per video (TSN style) from the cached ones.")
    layers: int = option(2, "H temporal transformer layers (the paper's best is 8).")
    heads: int = option(8, "Attention heads.")
    dropout: float = option(0.1, "Dropout in the temporal layers.")
    logit_scale_init: float = option(100.0, "Initial scale of the cosine classifiers (CLIP's 100).")
    max_frames: int = option(512, "Size of the learned temporal position table.")
    # CMDCL switches (the paper's ablations; see cmdcl_heads/cmdcl.py for what each does)
    tci: bool = option(True, "cmdcl: textual causal intervention (back-door over V_P); off: T' = T.")
    vci: bool = option(True, "cmdcl: visual causal intervention (front-door); off: V' = mean_t X.")
    mediator: bool = option(True, "cmdcl: text-guided fine-grained mediator inside VCI.")
    cross_sample: bool = option(True, "cmdcl: the VCI approximator term (see --approximator); off: "
                                      "V' = mean_t LN(Xm).")
    approximator: Literal["text", "dictionary"] = option(
        "text", "cmdcl: second input of the VCI approximator. text (default, what the paper's figure 4 draws): "
                "attention from the mediated frames to the debiased label texts T'; dictionary (*after CATT / "
                "ours*, the default before): attention over a k-means dictionary Z of training frames "
                "(needs `confounders build --kz K`).")
    mediator_mode: Literal["gate", "replace", "project"] = option(
        "gate", "cmdcl, *ours*: gate (Xm = X*sigmoid(M)), replace (Xm = M) or project (frames projected onto "
                "the fine-text span before the temporal encoder).")
    cross_sample_mode: Literal["attend", "backdoor"] = option(
        "attend", "cmdcl --approximator dictionary, *ours*: attend (attention over Z, fused) or backdoor (class "
                  "scores averaged over Z strata by P(z)).")
    static_removal: float = option(
        0.0, "cmdcl, *ours*: subtract this share (0..1) of each video's temporal mean from its normalised frames "
             "before the temporal encoder: what is constant over a video (its scene) is removed; 0: off. "
             "Needs --frames >= 3. No gain where the fine texts span the feature space (docs/causal-heads.md). " + HELD_OUT_WORLD)
    learn_text: bool = option(True, "cmdcl: the label text tables are learnable (initialised from texts.h5).")
    fine_label_set: str | None = option(None, "cmdcl: mediator vocabulary (default: the manifest's fine set).")
    # Shapes, resolved by the trainer from the data (a head is rebuilt from its config alone).
    dim: int = option(0, "Feature dimension D.", cli=False)
    num_classes: int = option(0, "Classes C of the target label set.", cli=False)
    num_fine: int = option(0, "Fine labels C_f of the mediator's own table; 0: it reads the target table.",
                           cli=False)
    kp: int = option(0, "Rows of V_P (0: no textual intervention).", cli=False)
    kz: int = option(0, "Rows of Z (0: no frame dictionary, e.g. --approximator text).", cli=False)
    tokens_per_frame: int = option(0, "P grid tokens per frame (0: frame features only).", cli=False)

    def __post_init__(self):
        check_choices(self)
        for name in ("frames", "heads", "max_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.layers < 0:
            raise ValueError(f"--layers must be >= 0, got {self.layers}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.static_removal <= 1.0:
            raise ValueError(f"--static-removal must be in [0, 1], got {self.static_removal}")
        if self.static_removal and self.model != "cmdcl":
            raise ValueError(f"--static-removal is a cmdcl switch; --model {self.model} would ignore it "
                             "(train --model cmdcl, or pass --static-removal 0)")
        if self.static_removal and self.frames < 3:
            raise ValueError(f"--static-removal with --frames {self.frames}: one frame is its own temporal mean and "
                             "two frames minus their mean are each other's opposite, so little or nothing of the "
                             "input is left (sample 3 or more frames, or pass --static-removal 0)")
        if self.cross_sample_mode == "backdoor" and self.approximator != "dictionary":
            raise ValueError("--cross-sample-mode backdoor averages over the strata of the frame dictionary Z: "
                             "add --approximator dictionary (the figure-4 approximator reads T', not Z)")
        if self.logit_scale_init <= 0:
            raise ValueError(f"--logit-scale-init must be > 0, got {self.logit_scale_init}")
        if self.dim and self.dim % self.heads:
            raise ValueError(f"--heads {self.heads} does not divide the feature dimension {self.dim}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        """A checkpoint's head: one written before `approximator` existed had the dictionary approximator."""
        if "approximator" not in d and d.get("model", "cmdcl") == "cmdcl":
            d = {**d, "approximator": "dictionary"}
        return from_dict(cls, d, "head configuration")


@dataclass(frozen=True)
class TrainConfig:
    cache: str = option(None, "Cache folder holding the shards, or a folder above it.", required=True)
    dataset: str = option(None, "Manifest: built-in name (coin, breakfast, demo...) or folder.", required=True)
    out: str = option(None, "Run folder (checkpoints, metrics, plots, config.toml).", required=True)
    label_set: str | None = option(None, "Target label set (default: the manifest's default).")
    split_scheme: str | None = option(None, "Split scheme (e.g. s1..s4, vis4mer); default: the first.")
    train_split: str = option("train", "Split trained on.")
    eval_split: str = option("test", "Split reported in summary.json (any declared split), evaluated once at "
                                     "the end with best.")
    select_split: str = option(
        "auto", "Split whose primary metric picks best: auto (the manifest's split of role val that has videos "
                "for the label set, else none), none (best = last epoch), or a split; never the eval split, "
                "and not a split of role test unless --force-select.")
    force_select: bool = option(False, "Allow --select-split to name a split whose role is test (the numbers "
                                       "reported on it are then optimistic).")
    eval_each_epoch: bool = option(False, "Also evaluate --eval-split after every epoch, for the curves "
                                          "(never used to select).")
    epochs: int = option(10, "Training epochs.")
    batch_size: int = option(32, "Videos per step.")
    lr: float = option(1e-3, "Peak AdamW learning rate.")
    weight_decay: float = option(0.05, "AdamW weight decay (matrices only).")
    warmup: float = option(1.0, "Linear warm-up length in epochs (then cosine).")
    clip_grad: float = option(1.0, "Max gradient norm (0: no clipping).")
    reweight_strata: int = option(
        0, "*ours*: weight each training video's loss by P(y)/P(y|z) over K k-means strata z of the training "
           "videos (a back-door adjustment on an inferred confounder); 0: off. text4vis and cmdcl, single-label, "
           "K below the number of training videos. Small gains only in our study (docs/causal-heads.md). " + HELD_OUT_WORLD)
    seed: int = option(0, "Seed of initialisation and sampling.")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    precision: Literal["fp32", "bf16"] = option(
        "fp32", "fp32 (TF32 matmuls on CUDA) or bf16 autocast on CUDA; the CPU computes in fp32.")
    data_mode: Literal["auto", "memory", "lazy"] = option(
        "auto", "memory: all features on the device; lazy: HDF5 reads in workers; auto: memory when it fits.")
    workers: int = option(2, "DataLoader workers in lazy mode.")
    eval_every: int = option(1, "Evaluate the selection split every k epochs (and after the last).")
    cudnn_attention: bool = option(False, "Let training use cuDNN's fused attention on GPU (off by default: "
                                          "its bf16 backward is reported to return NaN gradients on H100/H200, "
                                          "pytorch/pytorch#196678).")
    tokens: bool | None = option(None, "Use grid tokens (default: when the cache has them).")
    skip_missing: bool = option(False, "Skip split videos missing from the cache instead of failing.")
    quiet: bool = option(False, "No progress bar or table.")
    resume: bool = option(False, "Continue the run in --out from its last checkpoint (one killed after its last "
                                 "epoch gets its final evaluation and summary; one with no checkpoint yet starts "
                                 "from scratch).")

    def __post_init__(self):
        check_choices(self)
        if self.reweight_strata < 0 or self.reweight_strata == 1:
            raise ValueError(f"--reweight-strata must be 0 (off) or >= 2, got {self.reweight_strata}")
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup < 0 or self.clip_grad < 0 or self.workers < 0:
            raise ValueError("--lr must be > 0; --weight-decay, --warmup, --clip-grad and --workers >= 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return from_dict(cls, d, "training configuration")


# Training options that may differ between an interrupted run and its resumption without changing the result.
RESUME_FREE = frozenset({"device", "data_mode", "workers", "quiet", "eval_every", "resume", "cudnn_attention",
                         "cache", "dataset", "out", "eval_each_epoch"})
