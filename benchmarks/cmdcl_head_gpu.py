"""CMDCL head at real sizes on one GPU: step time and peak memory (fp32 and bf16 autocast), frames only and
with grid tokens, the exact ablations on the device, and a short fit on separable synthetic data.

    python benchmarks/cmdcl_head_gpu.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from cmdcl_heads.config import HeadConfig
from cmdcl_heads.confounders import Confounders
from cmdcl_heads.models import make_head


def make(d, c, cf, kp, kz, **cfg):
    g = torch.Generator().manual_seed(0)
    conf = Confounders(vp=torch.randn(kp, d, generator=g), vp_prior=torch.full((kp,), 1 / kp),
                       z=torch.randn(kz, d, generator=g), z_prior=torch.rand(kz, generator=g).softmax(0))
    text = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    fine = F.normalize(torch.randn(cf, d, generator=g), dim=-1)
    torch.manual_seed(0)
    return make_head(HeadConfig(**cfg), text, fine, conf), text


def step_time(head, frames, tokens, y, amp, steps):
    dev = frames.device
    opt = torch.optim.AdamW(head.parameters(), lr=1e-4)
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(head(frames, tokens), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    assert torch.isfinite(loss), loss
    return (time.perf_counter() - t0) / steps * 1e3, torch.cuda.max_memory_allocated(dev) / 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    steps = 5 if args.quick else 20
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    rows = []
    D, C, CF, KP, KZ, B = 768, 180, 778, 256, 512, 64
    for layers, t, p in [(2, 32, 0), (8, 32, 0), (8, 16, 16)]:
        head, _ = make(D, C, CF, KP, KZ, layers=layers, frames=t, tokens_per_frame=p, dropout=0.1)
        head = head.to(dev).train()
        frames = torch.randn(B, t, D, device=dev)
        tokens = torch.randn(B, t, p, D, device=dev) if p else None
        y = torch.randint(0, C, (B,), device=dev)
        for amp in (False, True):
            ms, gib = step_time(head, frames, tokens, y, amp, steps)
            row = dict(D=D, H=layers, T=t, P=p, B=B, C=C, Cf=CF, Kp=KP, Kz=KZ, amp_bf16=amp,
                       step_ms=round(ms, 2), peak_GiB=round(gib, 2))
            rows.append(row)
            print(json.dumps(row), flush=True)

    # exact ablations on the device
    head, text = make(64, 10, 20, 8, 16, layers=2, tci=False, dropout=0.0)
    head = head.to(dev).eval()
    assert torch.equal(head.text_features()[0], text.to(dev)), "no-tci: T' != T on cuda"
    head, _ = make(64, 10, 20, 8, 16, layers=2, vci=False, dropout=0.0)
    head = head.to(dev).eval()
    x = torch.randn(4, 8, 64, device=dev)
    v, xx, _ = head.video_features(x, None, None)
    assert torch.equal(v, head.encoder(F.normalize(x, dim=-1)).mean(1)), "no-vci: V' != mean_t X on cuda"
    print("ablations exact on cuda: ok", flush=True)

    # a short fit: the class is carried by which atomic-action prototype appears, under a random background
    torch.manual_seed(0)
    d, c = 128, 10
    protos = torch.randn(c, d, device=dev)
    head, _ = make(d, c, 2 * c, 32, 64, layers=2, frames=16, dropout=0.1)
    head = head.to(dev).train()
    opt = torch.optim.AdamW(head.parameters(), lr=3e-4)

    def batch(n):
        y = torch.randint(0, c, (n,), device=dev)
        bg = 2 * torch.randn(n, 1, d, device=dev)
        return protos[y][:, None] + bg + torch.randn(n, 16, d, device=dev), y

    for i in range(300):
        xb, yb = batch(128)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(head(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    head.eval()
    xb, yb = batch(2000)
    with torch.no_grad():
        acc = (head(xb).argmax(-1) == yb).float().mean().item()
    print(json.dumps({"fit_accuracy": round(acc, 4), "chance": 1 / c, "final_loss": round(loss.item(), 4)}))
    assert acc > 0.5


if __name__ == "__main__":
    main()
