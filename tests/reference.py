"""The plain float64 references every numerics test compares against (DESIGN §2), written
once: AFIE of a spectrum, the covariance of conv outputs, a relative error."""
import numpy as np
import torch


def afie(s, n_filters=None):
    """(K, AFIE) of a spectrum: min-max (flat → 0), softmax, natural-log entropy, K / c."""
    s = np.asarray(s, dtype=np.float64)
    span = s.max() - s.min()
    t = np.zeros_like(s) if span <= 1e-12 * max(s.max(), 1e-30) else (s - s.min()) / span
    q = np.exp(t) / np.exp(t).sum()
    k = float(-(q * np.log(q)).sum())
    return k, k / (n_filters or len(s))


def covariance(batches):
    """Mean and covariance (n − 1) of conv outputs: every (n, h, w) position of each (N, C,
    H, W) batch is an observation of the C channels (any device or dtype)."""
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    x = np.concatenate([b.detach().double().cpu().permute(0, 2, 3, 1).reshape(-1, b.shape[1]).numpy()
                        for b in batches])
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def rel_err(a, b):
    """Largest absolute difference relative to the largest magnitude of the reference b."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def macs_and_params(model, x):
    """MACs per input (FLOPs / 2, as torch.utils.flop_counter.FlopCounterMode counts them:
    conv, linear, matmul) and the parameter count: what prune() reports."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return round(counter.get_total_flops() / 2 / len(x)), sum(p.numel() for p in model.parameters())
