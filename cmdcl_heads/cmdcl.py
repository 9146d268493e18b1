"""CMDCL head: Cross-Modal Dual-Causal Learning (arXiv 2507.06603) on cached CLIP features.

From the paper: the structural causal model (B cross-modal bias, Z visual confounder, V video, T text,
M mediator, Y label); a back-door adjustment on the text (Textual Causal Intervention, TCI) and a
front-door adjustment on the video through a text-guided fine-grained mediator (Visual Causal
Intervention, VCI); H stacked temporal attention layers (best H = 8); CLIP features and label texts.
The paper publishes no code; everything below marked *inferred* is our reading (see README, "The CMDCL head").

Read top to bottom, with F [B, T, D] frames (optionally grid tokens [B, T, P, D]), E [C, D] the target
label text ensemble, E_f [Cf, D] the fine vocabulary, V_P [Kp, D] / Z [Kz, D] the dictionaries:

    T       = E (learnable), T_f = E_f (learnable)                              TCI (back-door on T)
    A       = softmax(T Wq (V_P Wk)^T / sqrt d + log P(b))        = renormalised  A0 * P(b)   *inferred*
    b       = A V_P Wv                                             NWGM expectation of the bias
    T'      = LN(T + Wo [T ; b])                                   approximator
    X       = STA^H(Linear(F) + pos)                                                   VCI (front-door on V)
    S       = softmax(X Wq' (T'_f Wk')^T / sqrt d)                 text-guided mediator over atomic actions
    M       = S T'_f Wv' ;  Xm = X * sigmoid(M)
    CS      = softmax(Xm Wq'' (Z Wk'')^T / sqrt d + log P(z)) Z Wv''                cross-sample term
    V'      = mean_t LN(Xm + Wf [Xm ; CS])
    logits  = s * cos(V', T'_c),  s = exp(log_s), s_0 = 100

Mediator modes (HeadConfig.mediator_mode; *inferred/ours*, NOT in the paper, which only says that VCI
goes through a text-guided fine-grained mediator; added to test our reading of the front-door on
benchmarks/confounded.py, see BENCHMARKS.md "CMDCL variants"):

    gate     (default)  Xm = X * sigmoid(M), as above: M can only rescale X, so whatever X carries (the
                        scene included) still reaches V'.
    replace             Xm = M = S T'_f Wv', with Wv' initialised to the identity instead of zero: the
                        prediction goes through the mediator only (front-door: Y depends on V only via M),
                        M lies in the span of Wv' T'_f. The temporal encoder and the attention scores are
                        still learned, so the scores can still read the scene.
    project             the mediator comes BEFORE the temporal encoder and has no learned part:
                        X = STA^H(Linear(P_f F / ||P_f F||) + pos), with P_f the orthogonal projector onto the span of
                        the FROZEN fine-text ensemble E_f (its CLIP text embeddings, not the learnable T_f:
                        a learnable basis could rotate toward the shortcut), and Xm = X. Every frame is
                        reduced to its atomic-action content before anything is learned; order is kept
                        because the projection is per frame. Needs a fine set with Cf < D (else P_f = I).

Cross-sample mode (HeadConfig.cross_sample_mode; *inferred/ours*, NOT in the paper):

    attend   (default)  CS as above, one attention-weighted Z entry per time step, fused by concatenation.
    backdoor            an explicit adjustment over the Z strata instead of the NWGM attention:
                        V'_z = mean_t LN(Xm + Wf [Xm ; z]) for every entry z of Z, and
                        logits = sum_z P(z) s cos(V'_z, T'_c): the class score averaged over the strata with
                        their prior (expectation of the score, not of the probability, so that the same
                        logits serve cross-entropy and BCE). Wf starts at zero, so it starts equal to
                        cross_sample=False. Memory grows with K_z: [B, T, K_z, D] activations.

Switches (HeadConfig): tci=False -> T' = T exactly (and T'_f = T_f); vci=False -> V' = mean_t X exactly;
mediator=False -> Xm = X; cross_sample=False -> V' = mean_t LN(Xm). Modules that a switch turns off are
not built, so every parameter of a built head is used.

Initialisation (*inferred*): the output projections Wo, Wv' (mediator values) and Wf are zero, so the
untrained head computes T' = LN(T), Xm = X / 2 and V' = mean_t LN(X / 2) = mean_t LN(X): the Text4Vis
path, and with H = 0 (where X = normalised F) zero-shot CLIP up to LayerNorm's centring. Why: the causal
branches then start as exact no-ops and grow from there (as residual branches do in ReZero/ControlNet),
so a fresh head is never worse than the text classifier it refines, and training is stable even with
an untrained dictionary attention. The gradient still reaches every parameter: on the first step the
zero projections get a gradient (their inputs are non-zero), and from the second step on so does
everything feeding them.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from cmdcl_heads.config import HeadConfig
from cmdcl_heads.layers import TemporalEncoder
from cmdcl_heads.models import cosine_logits

LOG_PRIOR_FLOOR = 1e-12  # an empty cluster gets (almost) no weight instead of -inf


def _build_hint() -> str:
    return "build them with `cmdcl-heads confounders build --cache DIR --dataset D`"


class DictionaryAttention(nn.Module):
    """out = softmax(Q Wq (K Wk)^T / sqrt d + log prior) K Wv, single head, over a fixed key set K [N, D].

    Adding log prior inside the softmax equals multiplying the attention by the prior and renormalising:
    softmax(s + log p)_k = A_k p_k / sum_j A_j p_j. That is our reading (*inferred*) of the NWGM term
    (A * prior) V_P Wv: without the renormalisation its weights sum to sum_k A_k p_k ~ 1/K, a scale that
    shrinks with the dictionary size and that the next layer would have to undo.
    """

    def __init__(self, dim: int, zero_values: bool = False):
        super().__init__()
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        if zero_values:
            nn.init.zeros_(self.v.weight)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, log_prior: torch.Tensor | None = None):
        scores = self.q(query) @ self.k(keys).T * self.scale          # [..., Nq, N]
        if log_prior is not None:
            scores = scores + log_prior
        attn = scores.softmax(dim=-1)
        return attn @ self.v(keys), attn


class TextualIntervention(nn.Module):
    """Back-door adjustment on the text through the bias prototypes V_P: T' = LN(T + Wo [T ; b])."""

    def __init__(self, dim: int, vp: torch.Tensor, vp_prior: torch.Tensor, dropout: float):
        super().__init__()
        # Dictionaries are frozen statistics of the training frames: buffers, L2-normalised like the frames.
        self.register_buffer("vp", F.normalize(vp.float(), dim=-1))
        self.register_buffer("log_prior", vp_prior.float().clamp_min(LOG_PRIOR_FLOOR).log())
        self.attn = DictionaryAttention(dim)
        self.out = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.ln = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, t: torch.Tensor):
        b, attn = self.attn(t, self.vp, self.log_prior)
        return self.ln(t + self.out(torch.cat([t, self.drop(b)], dim=-1))), attn


class CMDCLHead(nn.Module):
    """The CMDCL head. forward(frames [B, T, D], tokens [B, T, P, D] | None) -> logits [B, C].

    `text` [C, D]: the target label ensemble E. `fine_text` [Cf, D]: the fine vocabulary for the mediator
    (COIN steps, Breakfast actions); None -> the target labels themselves (DESIGN.md). `confounders`:
    a `Confounders` (V_P needed when cfg.tci, Z when cfg.vci and cfg.cross_sample).

    *inferred*: the fine vocabulary is a second learnable text table, initialised from its own CLIP
    ensemble, and goes through the SAME textual intervention as the target labels (T'_f = TCI(T_f)): the
    cross-modal bias that TCI removes is a property of the text tower and of the training footage, not of
    one vocabulary, so the mediator should attend to debiased atomic-action texts. With no fine set
    (fine_text None, or equal to `text`, which is what the trainer passes then), the mediator reads T'.
    """

    def __init__(self, cfg: HeadConfig, text: torch.Tensor, fine_text: torch.Tensor | None = None,
                 confounders=None):
        super().__init__()
        self.cfg = cfg
        text = torch.as_tensor(text, dtype=torch.float32)
        dim = text.shape[1]
        self.dim = dim
        need_vp, need_z = cfg.tci, cfg.vci and cfg.cross_sample
        if (need_vp or need_z) and confounders is None:
            raise ValueError("CMDCL needs the confounder dictionaries (V_P for --tci, Z for the cross-sample "
                             f"term); {_build_hint()}, or train with --no-tci --no-cross-sample")
        if confounders is not None and confounders.dim != dim and (need_vp or need_z):
            raise ValueError(f"confounders have D={confounders.dim} but the text embeddings have D={dim}; "
                             f"they come from another model: rebuild them ({_build_hint()})")

        self.text = nn.Parameter(text.clone()) if cfg.learn_text else None
        if not cfg.learn_text:
            self.register_buffer("text_buf", text.clone())
        mode = getattr(cfg, "mediator_mode", "gate")
        self.mediator_mode = mode if (cfg.vci and cfg.mediator) else None
        if self.mediator_mode == "project":
            # fixed orthonormal basis of span(E_f) [r, D]; E_f = the target texts when there is no finer set
            basis = torch.as_tensor(fine_text if fine_text is not None else text, dtype=torch.float32)
            if basis.shape[1] != dim:
                raise ValueError(f"fine_text has D={basis.shape[1]}, text has D={dim}")
            u, sv, vh = torch.linalg.svd(basis, full_matrices=False)
            self.register_buffer("fine_basis", vh[sv > sv[0] * 1e-5].contiguous())
            if len(self.fine_basis) >= dim:
                warnings.warn(f"mediator_mode='project': the {basis.shape[0]} fine texts span all D={dim} "
                              "dimensions, so the projection is the identity and removes nothing (e.g. COIN's "
                              "778 steps with D=512); use the gate or replace mode", stacklevel=2)
            fine_text = None
        # the gate and replace modes read the fine texts through the mediator attention
        self.uses_fine = self.mediator_mode in ("gate", "replace")
        if fine_text is not None and torch.equal(torch.as_tensor(fine_text, dtype=torch.float32), text):
            fine_text = None  # the trainer passes the target texts when there is no finer set: share T
        self.has_fine = self.uses_fine and fine_text is not None
        if self.has_fine:
            fine = torch.as_tensor(fine_text, dtype=torch.float32)
            if fine.shape[1] != dim:
                raise ValueError(f"fine_text has D={fine.shape[1]}, text has D={dim}")
            if cfg.learn_text:
                self.fine_text = nn.Parameter(fine.clone())
            else:
                self.register_buffer("fine_text_buf", fine.clone())

        self.tci = TextualIntervention(dim, confounders.vp, confounders.vp_prior, cfg.dropout) if cfg.tci else None
        tokens_per_frame = getattr(cfg, "tokens_per_frame", 0) or 0
        self.tokens_per_frame = tokens_per_frame
        self.encoder = TemporalEncoder(dim, cfg.layers, cfg.heads, cfg.max_frames, cfg.dropout,
                                       tokens_per_frame=tokens_per_frame)
        if self.uses_fine:
            replace = self.mediator_mode == "replace"
            self.mediator = DictionaryAttention(dim, zero_values=not replace)   # gate: M = 0 at init
            if replace:
                # Xm = M must carry the signal from the start: Wv' = I, so M = S T'_f at init
                with torch.no_grad():
                    self.mediator.v.weight.copy_(torch.eye(dim))
        if need_z:
            self.register_buffer("z", F.normalize(confounders.z.float(), dim=-1))
            self.register_buffer("z_log_prior", confounders.z_prior.float().clamp_min(LOG_PRIOR_FLOOR).log())
            self.backdoor = getattr(cfg, "cross_sample_mode", "attend") == "backdoor"
            if not self.backdoor:
                self.cross = DictionaryAttention(dim)
            self.fuse = nn.Linear(2 * dim, dim)
            nn.init.zeros_(self.fuse.weight)
            nn.init.zeros_(self.fuse.bias)
            self.drop = nn.Dropout(cfg.dropout)
        if cfg.vci:
            self.out_ln = nn.LayerNorm(dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))

    # ------------------------------------------------------------------------------------------ text

    def _tables(self):
        return (self.text if self.text is not None else self.text_buf,
                (self.fine_text if self.cfg.learn_text else self.fine_text_buf) if self.has_fine else None)

    def text_features(self):
        """(T' [C, D], T'_f [Cf, D] or None, TCI attention over V_P [C, Kp] or None)."""
        t, tf = self._tables()
        if self.tci is None:
            return t, (tf if tf is not None else (t if self.uses_fine else None)), None
        t_prime, attn = self.tci(t)
        tf_prime = self.tci(tf)[0] if tf is not None else (t_prime if self.uses_fine else None)
        return t_prime, tf_prime, attn

    # ----------------------------------------------------------------------------------------- video

    def _inputs(self, frames, tokens):
        if frames.dim() != 3 or frames.shape[-1] != self.dim:
            raise ValueError(f"frames must be [B, T, {self.dim}], got {tuple(frames.shape)}")
        frames = F.normalize(frames.float(), dim=-1)   # cached features are raw CLIP outputs
        if tokens is not None:   # their count is checked by the encoder
            tokens = F.normalize(tokens.float(), dim=-1)
        return frames, tokens

    def _project(self, x):
        """P_f x / ||P_f x||: the direction of x's part in the span of the frozen fine texts
        (mediator_mode='project'). Renormalised so that how much of a frame the scene takes up does not
        scale its atomic-action content either."""
        return F.normalize((x @ self.fine_basis.T) @ self.fine_basis, dim=-1)

    def video_features(self, frames, tokens, tf_prime):
        """(V' [B, D] (cross_sample_mode backdoor: V'_z [B, Kz, D]), X [B, T, D], parts: mediator
        S [B, T, Cf], cross-sample weights [B, T, Kz] (attend mode))."""
        frames, tokens = self._inputs(frames, tokens)
        if self.mediator_mode == "project":
            frames = self._project(frames)
            tokens = self._project(tokens) if tokens is not None else None
        x = self.encoder(frames, tokens)
        parts = {}
        if not self.cfg.vci:
            return x.mean(dim=1), x, parts
        xm = x
        if self.uses_fine:
            m, parts["mediator"] = self.mediator(x, tf_prime)
            xm = m if self.mediator_mode == "replace" else x * torch.sigmoid(m)
        if getattr(self, "backdoor", False):
            # Wf [Xm ; z] = Wx Xm + Wz z + b, one fused feature per stratum z: [B, T, Kz, D] -> V'_z [B, Kz, D]
            wx, wz = self.fuse.weight[:, :self.dim], self.fuse.weight[:, self.dim:]
            per_z = self.drop(self.z @ wz.T + self.fuse.bias)                          # [Kz, D]
            h = self.out_ln((xm + xm @ wx.T)[:, :, None, :] + per_z)
            return h.mean(dim=1), x, parts
        if hasattr(self, "cross"):
            cs, parts["cross_sample"] = self.cross(xm, self.z, self.z_log_prior)
            h = self.out_ln(xm + self.fuse(torch.cat([xm, self.drop(cs)], dim=-1)))
        else:
            h = self.out_ln(xm)
        return h.mean(dim=1), x, parts

    # -------------------------------------------------------------------------------------- classify

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def _logits(self, v, t):
        logits = cosine_logits(self.logit_scale, v, t)
        if logits.dim() == 3:   # cross_sample_mode='backdoor': V'_z [B, Kz, D] -> sum_z P(z) score_z
            logits = torch.einsum("bzc,z->bc", logits, self.z_log_prior.softmax(0))
        return logits

    def forward(self, frames: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        t_prime, tf_prime, _ = self.text_features()
        v, _, _ = self.video_features(frames, tokens, tf_prime)
        return self._logits(v, t_prime)

    @torch.no_grad()
    def explain(self, frames: torch.Tensor, tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Attention maps behind a prediction (eval mode is the caller's business).

        Keys: logits [B, C]; pred [B]; mediator [B, T, Cf] (S, which atomic actions each time step reads);
        tci [C, Kp] (the renormalised weights A*P(b) over V_P for every class) and tci_pred [B, Kp] (the
        row of the predicted class); cross_sample [B, T, Kz] (weights over Z). Maps of switched-off parts
        are absent.
        """
        t_prime, tf_prime, a = self.text_features()
        v, _, parts = self.video_features(frames, tokens, tf_prime)
        logits = self._logits(v, t_prime)
        out = {"logits": logits, "pred": logits.argmax(dim=-1), **parts}
        if a is not None:
            out["tci"] = a
            out["tci_pred"] = a[out["pred"]]
        return out
