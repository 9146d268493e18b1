"""CMDCL head: Cross-Modal Dual-Causal Learning (arXiv 2507.06603) on cached CLIP features.

From the paper: the structural causal model (B cross-modal bias, Z visual confounder, V video, T text,
M mediator, Y label); a back-door adjustment on the text (Textual Causal Intervention, TCI) and a
front-door adjustment on the video through a text-guided fine-grained mediator (Visual Causal
Intervention, VCI); H stacked spatio-temporal attention layers (best H = 8, 64 frames: fig. 6); CLIP
features and label texts; the architecture as figure 4 draws it.
The paper publishes no code; everything below marked *inferred* is our reading (docs/cmdcl-head.md).

Read top to bottom, with F [B, T, D] frames (optionally grid tokens [B, T, P, D]), E [C, D] the target
label text ensemble, E_f [Cf, D] the fine vocabulary, V_P [Kp, D] / Z [Kz, D] the dictionaries:

    T       = E (learnable), T_f = E_f (learnable)                              TCI (back-door on T)
    A       = softmax(T Wq (V_P Wk)^T / sqrt d + log P(b))        = renormalised  A0 * P(b)   *inferred*
    b       = A V_P Wv                                             NWGM expectation of the bias
    T'      = LN(T + Wo [T ; b])                                   approximator
    X       = STA^H(Linear(F) + pos)                                                   VCI (front-door on V)
    S       = softmax(X Wq' (T'_f Wk')^T / sqrt d)                 text-guided mediator over atomic actions
    M       = S T'_f Wv' ;  Xm = X * sigmoid(M)
    R       = softmax(Xm Wq'' (T' Wk'')^T / sqrt d) T' Wv''        VCI approximator (figure 4, default)
    V'      = mean_t LN(Xm + Wf [Xm ; R])
    logits  = s * cos(V', T'_c),  s = exp(log_s), s_0 = 100

What figure 4 (../shared/paper/fig4-framework.png) shows of VCI: V -> Spatio-Temporal Attention xH; its
output enters a "Fine-grained Info Aware" block with T' and a product with that block's output; a learnable
Approximator takes that product and T' and gives V'; the classifier takes T' and V'. No visual dictionary is
drawn in that branch. *inferred*: the product as the sigmoid gate above, the approximator as attention from
the mediated frames Xm to T' fused by concatenation, V' as the temporal mean; the figure gives no formulas.

Approximator (HeadConfig.approximator):

    text        (default) R as above: the approximator's second input is T', as figure 4 draws it.
    dictionary  *after CATT / ours* (the default before figure 4 was read): cross-sample attention over a
                k-means dictionary Z of training frames (built by `confounders build --kz K`),
                CS = softmax(Xm Wq'' (Z Wk'')^T / sqrt d + log P(z)) Z Wv'', V' = mean_t LN(Xm + Wf [Xm ; CS]).

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

Cross-sample mode (HeadConfig.cross_sample_mode, approximator='dictionary' only; *inferred/ours*, NOT in
the paper):

    attend   (default)  CS as above, one attention-weighted Z entry per time step, fused by concatenation.
    backdoor            an explicit adjustment over the Z strata instead of the NWGM attention:
                        V'_z = mean_t LN(Xm + Wf [Xm ; z]) for every entry z of Z, and
                        logits = sum_z P(z) s cos(V'_z, T'_c): the class score averaged over the strata with
                        their prior (expectation of the score, not of the probability, so that the same
                        logits serve cross-entropy and BCE). Wf starts at zero, so it starts equal to
                        cross_sample=False. Memory grows with K_z: [B, T, K_z, D] activations.

Static removal (HeadConfig.static_removal, *ours*, NOT in the paper; cmdcl_heads/debias.py): before
everything above, x_t <- normalise(x_t - lambda mean_s x_s), removing what is constant over the video.

Switches (HeadConfig): tci=False -> T' = T exactly (and T'_f = T_f); vci=False -> V' = mean_t X exactly;
mediator=False -> Xm = X; cross_sample=False -> V' = mean_t LN(Xm) (no approximator term, either reading).
Modules that a switch turns off are not built, so every parameter of a built head is used.

Built from the HeadConfig alone (its shapes: dim, num_classes, num_fine, kp, kz, tokens_per_frame), with
zero tables; `initialise(inputs)` then copies the label texts and the dictionaries in before training. A
trained head is its config plus its state dict: the dictionaries are buffers, so a run evaluates with
its own whatever confounders.h5 holds now.

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

from .config import HeadConfig
from .confounders import needs_z
from .debias import remove_static
from .layers import DictionaryAttention, TemporalEncoder, cosine_logits

LOG_PRIOR_FLOOR = 1e-12  # an empty cluster gets (almost) no weight instead of -inf


def _build_hint() -> str:
    return "build them with `cmdcl-heads confounders build --cache DIR --dataset D`"


class TextualIntervention(nn.Module):
    """Back-door adjustment on the text through the bias prototypes V_P: T' = LN(T + Wo [T ; b])."""

    def __init__(self, dim: int, kp: int, dropout: float):
        super().__init__()
        # Dictionaries are frozen statistics of the training frames: buffers, L2-normalised like the frames.
        self.register_buffer("vp", torch.zeros(kp, dim))
        self.register_buffer("log_prior", torch.zeros(kp))
        self.attn = DictionaryAttention(dim)
        self.out = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.ln = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, t: torch.Tensor):
        b, attn = self.attn(t, self.vp, self.log_prior)
        return self.ln(t + self.out(torch.cat([t, self.drop(b)], dim=-1))), attn


def _log_prior(prior: torch.Tensor) -> torch.Tensor:
    return prior.float().clamp_min(LOG_PRIOR_FLOOR).log()


class CMDCLHead(nn.Module):
    """The CMDCL head. forward(frames [B, T, D], tokens [B, T, P, D] | None) -> logits [B, C].

    *inferred*: the fine vocabulary (cfg.num_fine > 0: COIN steps, Breakfast actions) is a second learnable
    text table, initialised from its own CLIP ensemble, and goes through the SAME textual intervention as
    the target labels (T'_f = TCI(T_f)): the cross-modal bias that TCI removes is a property of the text
    tower and of the training footage, not of one vocabulary, so the mediator should attend to debiased
    atomic-action texts. With no fine set (num_fine 0), the mediator reads T'.
    """

    trainable = True

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        dim = self.dim = cfg.dim
        need_vp, need_z = cfg.tci, needs_z(cfg)
        if need_vp and cfg.kp < 1:
            raise ValueError(f"CMDCL's --tci needs the bias prototypes V_P; {_build_hint()}, or train with --no-tci")
        if need_z and cfg.kz < 1:
            raise ValueError("--approximator dictionary needs the frame dictionary Z; build it with `cmdcl-heads "
                             "confounders build --cache DIR --dataset D --kz 512`, or use --approximator text")
        table = torch.zeros(cfg.num_classes, dim)
        self.text = nn.Parameter(table) if cfg.learn_text else None
        if not cfg.learn_text:
            self.register_buffer("text_buf", table.clone())
        self.mediator_mode = cfg.mediator_mode if (cfg.vci and cfg.mediator) else None
        if self.mediator_mode == "project":
            # orthogonal projector onto span(E_f) [D, D]; E_f = the target texts when there is no finer set
            self.register_buffer("fine_projector", torch.eye(dim))
        # the gate and replace modes read the fine texts through the mediator attention
        self.uses_fine = self.mediator_mode in ("gate", "replace")
        self.has_fine = self.uses_fine and cfg.num_fine > 0
        if self.has_fine:
            fine = torch.zeros(cfg.num_fine, dim)
            if cfg.learn_text:
                self.fine_text = nn.Parameter(fine)
            else:
                self.register_buffer("fine_text_buf", fine)
        self.tci = TextualIntervention(dim, cfg.kp, cfg.dropout) if cfg.tci else None
        self.tokens_per_frame = cfg.tokens_per_frame
        self.encoder = TemporalEncoder(dim, cfg.layers, cfg.heads, cfg.max_frames, cfg.dropout,
                                       tokens_per_frame=cfg.tokens_per_frame)
        if self.uses_fine:
            replace = self.mediator_mode == "replace"
            self.mediator = DictionaryAttention(dim, zero_values=not replace)   # gate: M = 0 at init
            if replace:
                # Xm = M must carry the signal from the start: Wv' = I, so M = S T'_f at init
                with torch.no_grad():
                    self.mediator.v.weight.copy_(torch.eye(dim))
        self.backdoor = need_z and cfg.cross_sample_mode == "backdoor"
        if need_z:   # *after CATT / ours*: the approximator reads a k-means dictionary Z of training frames
            self.register_buffer("z", torch.zeros(cfg.kz, dim))
            self.register_buffer("z_log_prior", torch.zeros(cfg.kz))
            if not self.backdoor:
                self.cross = DictionaryAttention(dim)
        elif cfg.vci and cfg.cross_sample:   # figure 4: the approximator reads the debiased texts T'
            self.approx = DictionaryAttention(dim)
        if cfg.vci and cfg.cross_sample:
            self.fuse = nn.Linear(2 * dim, dim)
            nn.init.zeros_(self.fuse.weight)
            nn.init.zeros_(self.fuse.bias)
            self.drop = nn.Dropout(cfg.dropout)
        if cfg.vci:
            self.out_ln = nn.LayerNorm(dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))

    @torch.no_grad()
    def initialise(self, inputs) -> None:
        """Copy the label texts (models.HeadInputs) and the dictionaries into the zero tables."""
        text = inputs.text.float()
        (self.text if self.text is not None else self.text_buf).copy_(text)
        fine = inputs.fine_text.float() if inputs.fine_text is not None else None
        if self.has_fine:
            (self.fine_text if self.cfg.learn_text else self.fine_text_buf).copy_(fine)
        if self.mediator_mode == "project":
            self.fine_projector.copy_(self._projector(fine if fine is not None else text))
        conf = inputs.confounders
        if self.tci is not None:
            self.tci.vp.copy_(F.normalize(conf.vp.float(), dim=-1))
            self.tci.log_prior.copy_(_log_prior(conf.vp_prior))
        if hasattr(self, "z"):
            self.z.copy_(F.normalize(conf.z.float(), dim=-1))
            self.z_log_prior.copy_(_log_prior(conf.z_prior))

    def _projector(self, basis: torch.Tensor) -> torch.Tensor:
        """P_f = V^T V for an orthonormal basis V of span(E_f) (the FROZEN CLIP ensemble of the fine texts)."""
        _, sv, vh = torch.linalg.svd(basis, full_matrices=False)
        v = vh[sv > sv[0] * 1e-5]
        if len(v) >= self.dim:
            warnings.warn(f"mediator_mode='project': the {basis.shape[0]} fine texts span all D={self.dim} "
                          "dimensions, so the projection is the identity and removes nothing (e.g. COIN's "
                          "778 steps with D=512); use the gate or replace mode", stacklevel=3)
        return v.T @ v

    # ------------------------------------------------------------------------------------------ text

    def tables(self):
        """(T [C, D], T_f [Cf, D] or None): the head's own label-text tables (learned or frozen buffers)."""
        return (self.text if self.text is not None else self.text_buf,
                (self.fine_text if self.cfg.learn_text else self.fine_text_buf) if self.has_fine else None)

    def text_features(self):
        """(T' [C, D], T'_f [Cf, D] or None, TCI attention over V_P [C, Kp] or None)."""
        t, tf = self.tables()
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
        return F.normalize(x @ self.fine_projector, dim=-1)

    def video_features(self, frames, tokens, tf_prime, t_prime=None):
        """(V' [B, D] (cross_sample_mode backdoor: V'_z [B, Kz, D]), X [B, T, D], parts: mediator
        S [B, T, Cf], the approximator's weights: over T' [B, T, C] (key approximator, figure 4) or over Z
        [B, T, Kz] (key cross_sample, the dictionary reading in attend mode)). t_prime: T' [C, D], read by
        the figure-4 approximator only."""
        frames, tokens = self._inputs(frames, tokens)
        if self.cfg.static_removal:   # *ours*: what is constant over the video goes (cmdcl_heads/debias.py)
            frames = remove_static(frames, self.cfg.static_removal)
            tokens = remove_static(tokens, self.cfg.static_removal) if tokens is not None else None
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
        if self.backdoor:
            # Wf [Xm ; z] = Wx Xm + Wz z + b, one fused feature per stratum z: [B, T, Kz, D] -> V'_z [B, Kz, D]
            wx, wz = self.fuse.weight[:, :self.dim], self.fuse.weight[:, self.dim:]
            per_z = self.drop(self.z @ wz.T + self.fuse.bias)                          # [Kz, D]
            h = self.out_ln((xm + xm @ wx.T)[:, :, None, :] + per_z)
            return h.mean(dim=1), x, parts
        if hasattr(self, "cross"):
            cs, parts["cross_sample"] = self.cross(xm, self.z, self.z_log_prior)
            h = self.out_ln(xm + self.fuse(torch.cat([xm, self.drop(cs)], dim=-1)))
        elif hasattr(self, "approx"):
            if t_prime is None:
                raise ValueError("the figure-4 approximator reads T': pass t_prime to video_features")
            a, parts["approximator"] = self.approx(xm, t_prime)
            h = self.out_ln(xm + self.fuse(torch.cat([xm, self.drop(a)], dim=-1)))
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
        v, _, _ = self.video_features(frames, tokens, tf_prime, t_prime)
        return self._logits(v, t_prime)

    @torch.no_grad()
    def explain(self, frames: torch.Tensor, tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Attention maps behind a prediction (eval mode is the caller's business).

        Keys: logits [B, C]; pred [B]; mediator [B, T, Cf] (S, which atomic actions each time step reads);
        tci [C, Kp] (the renormalised weights A*P(b) over V_P for every class) and tci_pred [B, Kp] (the
        row of the predicted class); approximator [B, T, C] (figure-4 approximator: weights over T') or
        cross_sample [B, T, Kz] (dictionary approximator: weights over Z). Maps of switched-off parts are absent.
        """
        t_prime, tf_prime, a = self.text_features()
        v, _, parts = self.video_features(frames, tokens, tf_prime, t_prime)
        logits = self._logits(v, t_prime)
        out = {"logits": logits, "pred": logits.argmax(dim=-1), **parts}
        if a is not None:
            out["tci"] = a
            out["tci_pred"] = a[out["pred"]]
        return out
