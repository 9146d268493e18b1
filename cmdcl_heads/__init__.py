"""cmdcl_heads: train baselines and CMDCL causal heads on cached CLIP features."""

__version__ = "0.1.0"
