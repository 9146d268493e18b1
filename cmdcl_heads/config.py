"""Head configuration: one dataclass whose fields mirror the `cmdcl-heads train` flags."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


MEDIATOR_MODES = ("gate", "replace", "project")
CROSS_SAMPLE_MODES = ("attend", "backdoor")


@dataclass
class HeadConfig:
    model: str = "cmdcl"             # zeroshot | linear | text4vis | cmdcl
    frames: int = 16                 # T frames sampled per video (TSN style) from the cached ones
    layers: int = 2                  # H temporal transformer layers (the paper's best is 8)
    heads: int = 8                   # attention heads
    dropout: float = 0.1
    logit_scale_init: float = 100.0  # CLIP's scale for cosine classifiers
    max_frames: int = 512            # size of the learned temporal position table
    tokens_per_frame: int = 0        # P grid tokens per frame (divided space-time attention); 0: frames only
    # CMDCL switches (the paper's ablations; see cmdcl_heads/cmdcl.py for what each does)
    tci: bool = True                 # textual causal intervention (back-door over V_P); off: T' = T
    vci: bool = True                 # visual causal intervention (front-door); off: V' = mean_t X
    mediator: bool = True            # text-guided fine-grained mediator inside VCI
    cross_sample: bool = True        # cross-sample approximator over Z inside VCI
    # *inferred/ours* (not in the paper): how the mediator enters the video path, see cmdcl_heads/cmdcl.py
    mediator_mode: str = "gate"      # gate: Xm = X*sigmoid(M) | replace: Xm = M | project: X = STA(P_f F)
    cross_sample_mode: str = "attend"  # *ours*: attend (CS = attention over Z) | backdoor (E_z P(z) score_z)
    learn_text: bool = True          # T learnable (initialised from the cached text ensemble)
    fine_label_set: str | None = None  # vocabulary for the mediator; None: the dataset's fine set

    def __post_init__(self):
        if self.mediator_mode not in MEDIATOR_MODES:
            raise ValueError(f"mediator_mode must be one of {', '.join(MEDIATOR_MODES)}, got {self.mediator_mode!r}")
        if self.cross_sample_mode not in CROSS_SAMPLE_MODES:
            raise ValueError(f"cross_sample_mode must be one of {', '.join(CROSS_SAMPLE_MODES)}, "
                             f"got {self.cross_sample_mode!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown head option(s): {', '.join(sorted(unknown))}")
        return cls(**d)
