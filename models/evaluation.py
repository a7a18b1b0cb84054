"""Per-point evaluation of a classifier: loss, correctness, margin and confidence logit.

What the training worker records at each evaluation (the ``evaluations`` table) and
what memorization and membership-inference scores are computed from.
"""

from __future__ import annotations

import numpy as np
import torch

COLUMNS = ("loss", "correct", "margin", "confidence_logit")


def evaluate_points(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                    batch: int = 2048) -> dict[str, np.ndarray]:
    """Per-point loss, correctness, margin (true logit minus the best other) and the
    LiRA confidence logit log p_y - log Σ_{k≠y} p_k, in eval mode, no gradients.

    The model's train/eval mode is restored afterwards. Returns one array per
    name of :data:`COLUMNS`, each of ``len(y)`` rows.
    """
    was_training = model.training
    model.eval()
    out = {k: [] for k in COLUMNS}
    with torch.no_grad():
        for i in range(0, len(y), batch):
            logits = model(x[i:i + batch]).double()
            yy = y[i:i + batch]
            logp = torch.log_softmax(logits, dim=1)
            true_logp = logp.gather(1, yy[:, None]).squeeze(1)
            others = logits.clone()
            others.scatter_(1, yy[:, None], float("-inf"))
            other_logp = logp.clone()
            other_logp.scatter_(1, yy[:, None], float("-inf"))
            out["loss"].append((-true_logp).cpu().numpy())
            out["correct"].append((logits.argmax(1) == yy).cpu().numpy())
            out["margin"].append((logits.gather(1, yy[:, None]).squeeze(1) - others.max(1).values).cpu().numpy())
            out["confidence_logit"].append((true_logp - torch.logsumexp(other_logp, dim=1)).cpu().numpy())
    model.train(was_training)
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``(x, y)`` classified correctly (NaN for no examples)."""
    return float(evaluate_points(model, x, y)["correct"].mean()) if len(y) else float("nan")


__all__ = ["COLUMNS", "accuracy", "evaluate_points"]
