"""The ``nn`` fill: a small seeded MLP regressor of r on the step (see :mod:`analysis.fits`).

Layer: ``analysis`` (pure numeric code; torch is imported lazily, inside the fit).
"""

from __future__ import annotations

import math
import time

import numpy as np

from .fill_records import Fit, Records, logit, no_options


class _threads:
    """Run torch on ``n`` threads inside the block (restored after)."""

    def __init__(self, torch, n: int):
        self.torch, self.n = torch, max(1, int(n))

    def __enter__(self):
        self.saved = self.torch.get_num_threads()
        self.torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        self.torch.set_num_threads(self.saved)


def fit_nn(rec: Records, seed: int, options: dict) -> Fit:
    import torch
    from torch import nn

    opts = dict(options)
    hidden = int(opts.pop("hidden", 64))
    embed_dim = int(opts.pop("embed_dim", 8))
    n_fourier = int(opts.pop("n_fourier", 4))
    n_iter = int(opts.pop("n_iter", 600))
    lr = float(opts.pop("lr", 1e-2))
    batch_size = int(opts.pop("batch_size", 4096))
    weight_decay = float(opts.pop("weight_decay", 1e-5))
    threads = int(opts.pop("threads", 1))
    no_options("nn", opts)
    for name, v in (("hidden", hidden), ("embed_dim", embed_dim), ("n_iter", n_iter),
                    ("batch_size", batch_size), ("threads", threads)):
        if v < 1:
            raise ValueError(f"nn: {name} must be >= 1, got {v}")
    if n_fourier < 0 or not lr > 0 or weight_decay < 0:
        raise ValueError("nn: n_fourier must be >= 0, lr > 0, weight_decay >= 0")

    P, N = rec.n_points, rec.steps.size
    width = max(rec.t_max - rec.t_min, 1.0)
    mean_r = np.bincount(rec.point, weights=rec.values, minlength=P) / rec.counts
    mr_center, mr_scale = float(mean_r.mean()), float(mean_r.std()) or 1.0
    n_in = 2 + 2 * n_fourier + 1 + embed_dim
    base = float(logit(np.array([rec.values.mean()]), 1e-4)[0])
    point_feat = torch.tensor((mean_r - mr_center) / mr_scale, dtype=torch.float32)

    def features(u):
        feats = [u, u * u]
        for k in range(1, n_fourier + 1):
            feats += [torch.sin(math.pi * k * u), torch.cos(math.pi * k * u)]
        return torch.stack(feats, dim=-1)

    # A tiny network: one thread is fastest, and more only contend with other work.
    with _threads(torch, threads), torch.random.fork_rng(devices=[]):
        started = time.perf_counter()
        torch.manual_seed(seed)  # the layers' default initialisation
        gen = torch.Generator().manual_seed(seed)  # embeddings and mini-batches
        emb = nn.Embedding(P, embed_dim)
        nn.init.normal_(emb.weight, std=0.1, generator=gen)
        mlp = nn.Sequential(nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                            nn.Linear(hidden, 1))
        with torch.no_grad():
            mlp[-1].bias.fill_(base)

        def forward(p, u):
            x = torch.cat([features(u), point_feat[p][:, None], emb(p)], dim=1)
            return torch.sigmoid(mlp(x)[:, 0])

        p_all = torch.as_tensor(rec.point, dtype=torch.long)
        u_all = torch.as_tensor((rec.steps - rec.t_min) / width, dtype=torch.float32)
        y_all = torch.as_tensor(rec.values, dtype=torch.float32)
        weights = list(mlp.parameters()) + list(emb.parameters())
        opt = torch.optim.Adam(weights, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_iter, eta_min=lr * 0.02)
        loss_val = float("nan")
        for _ in range(n_iter):
            if N > batch_size:
                b = torch.randint(0, N, (batch_size,), generator=gen)
                p, u, y = p_all[b], u_all[b], y_all[b]
            else:
                p, u, y = p_all, u_all, y_all
            opt.zero_grad()
            loss = torch.mean((forward(p, u) - y) ** 2)
            loss.backward()
            opt.step()
            sched.step()
            loss_val = float(loss.detach())
        seconds = time.perf_counter() - started

    # Evaluation splits the first layer: W1 x = W1_step φ(u) + W1_point ψ(p), each computed
    # once per distinct step / point of a chunk, so a dense fill costs ~ the second layer only.
    n_step_feat = 2 + 2 * n_fourier
    w1, b1 = mlp[0].weight.detach(), mlp[0].bias.detach()
    chunk = 1 << 15  # cache-sized: 4x faster than 1 << 18 on this machine

    def ev(p, tc):
        out = np.empty(p.shape)
        with _threads(torch, threads), torch.no_grad():
            for a in range(0, p.size, chunk):
                ut, t_inv = np.unique(tc[a:a + chunk], return_inverse=True)
                up, p_inv = np.unique(p[a:a + chunk], return_inverse=True)
                u = torch.as_tensor((ut - rec.t_min) / width, dtype=torch.float32)
                pp = torch.as_tensor(up, dtype=torch.long)
                step_part = features(u) @ w1[:, :n_step_feat].T
                point_part = torch.cat([point_feat[pp][:, None], emb(pp)], dim=1) @ w1[:, n_step_feat:].T + b1
                h = step_part[torch.as_tensor(t_inv.ravel())] + point_part[torch.as_tensor(p_inv.ravel())]
                z = mlp[1:](h)[:, 0]
                out[a:a + chunk] = torch.sigmoid(z).numpy()
        return out

    train_mse = float(np.mean((ev(rec.point, rec.steps) - rec.values) ** 2))
    params_out = {
        "architecture": f"MLP {n_in}-{hidden}-{hidden}-1, SiLU, sigmoid output",
        "features": ["u", "u^2"] + [f"sin/cos(pi*{k}*u)" for k in range(1, n_fourier + 1)]
        + ["mean record (standardised)", f"embedding[{embed_dim}]"],
        "step_origin": float(rec.t_min), "step_scale": float(width),
        "hidden": hidden, "embed_dim": embed_dim, "n_fourier": n_fourier, "n_iter": n_iter, "lr": lr,
        "batch_size": batch_size, "weight_decay": weight_decay, "seed": int(seed),
        "n_parameters": int(sum(t.numel() for t in weights)),
        "final_batch_loss": loss_val, "train_mse": train_mse, "train_seconds": seconds,
        "weight_norms": {name: float(t.detach().norm()) for name, t in mlp.named_parameters()},
        "embedding_norm_mean": float(emb.weight.detach().norm(dim=1).mean()),
        "n_points": P, "n_records": int(N), "exact_at_records": False,
    }
    return Fit("nn", params_out, rec, ev)
