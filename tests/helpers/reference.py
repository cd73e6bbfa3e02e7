"""Independent float64 references the library is checked against (numpy, no lawwatch code)."""

from __future__ import annotations

import numpy as np


def ols_pr(x: np.ndarray, y: np.ndarray, rcond: float | None = None) -> float:
    """PR = RSS / TSS of OLS with intercept, via numpy.linalg.lstsq in float64.

    ``y`` is (n,) for a scalar target or (n, K) for a multi-output one.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    design = np.hstack([x, np.ones((x.shape[0], 1))])
    coef, *_ = np.linalg.lstsq(design, y, rcond=rcond)
    resid = y - design @ coef
    centered = y - y.mean(axis=0)
    return float((resid**2).sum() / (centered**2).sum())


def onehot(ids: np.ndarray) -> np.ndarray:
    """(n,) ids -> (n, K) indicator over the distinct ids present."""
    distinct, index = np.unique(ids, return_inverse=True)
    out = np.zeros((ids.shape[0], distinct.shape[0]))
    out[np.arange(ids.shape[0]), index] = 1.0
    return out


def layer_norm(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Freshly initialized LayerNorm (weight 1, bias 0) over the last axis."""
    x = x - x.mean(axis=-1, keepdims=True)
    return x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + eps)


def line_fit(pr: np.ndarray) -> tuple[float, float, float]:
    """(slope, intercept, pearson r) of log10 PR against 0..L-1 (entry 0 already dropped)."""
    y = np.log10(pr)
    x = np.arange(y.shape[0], dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    r = np.corrcoef(x, y)[0, 1]
    return float(slope), float(intercept), float(r)


def rms_norm(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Freshly initialized RMSNorm (weight 1) over the last axis."""
    return x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + eps)


def standardize(x: np.ndarray) -> np.ndarray:
    """Per-token z-score over the last axis (population standard deviation)."""
    x = x - x.mean(axis=-1, keepdims=True)
    return x / x.std(axis=-1, keepdims=True)


def onehot_top_k(ids: np.ndarray, k: int) -> np.ndarray:
    """(n,) ids -> (n, k [+1]) indicator of the k most frequent ids (ties: smaller id first),
    plus one column for all other ids when there are any."""
    distinct, counts = np.unique(ids, return_counts=True)
    order = np.lexsort((distinct, -counts))  # by count descending, then id ascending
    kept = np.sort(distinct[order[:k]])
    columns = [ids == c for c in kept]
    rest = ~np.isin(ids, kept)
    if rest.any():
        columns.append(rest)
    return np.stack(columns, axis=1).astype(np.float64)


def fit_line(x: np.ndarray, pr: np.ndarray) -> tuple[float, float]:
    """(slope, pearson r) of log10 PR against x by numpy."""
    y = np.log10(pr)
    slope, _ = np.polyfit(x, y, 1)
    return float(slope), float(np.corrcoef(x, y)[0, 1])


def hf_residual_stream(model, ids, shifted: bool = False) -> list:
    """Entries 0..L of a float64 Hugging Face model on one unpadded sequence, from its own
    ``output_hidden_states`` (each ``(T, d)``; the last has the final norm applied).

    ``shifted``: Mamba and RWKV return the L block outputs and the final norm's output, without
    the embeddings; the embeddings are prepended and the unnormed last block output dropped.
    """
    import torch

    base = model.base_model
    with torch.no_grad():
        hs = [h[0] for h in base(ids[None], output_hidden_states=True).hidden_states]
        if shifted:
            hs = [base.get_input_embeddings()(ids[None])[0], *hs[:-2], hs[-1]]
    return hs


def protocol_pr(
    stream, probe, normalize, *, offset: int = 1, target=None, fresh_last: bool = False
) -> np.ndarray:
    """He & Su's protocol, literally, one unpadded sequence at a time.

    ``stream(ids) -> list of (T, d) float64 torch tensors`` gives entries 0..L; every entry
    but the last (all of them with ``fresh_last``) goes through ``normalize`` (numpy); the
    examples are positions j with j + offset inside the sequence; ``target(ids) -> y`` maps
    the (n,) target ids to the regressed values (default: the id as a float).
    """
    feats, targets = None, []
    for row, mask in zip(probe.input_ids, probe.attention_mask, strict=True):
        ids = row[mask.bool()]
        t = ids.numel()
        lo, hi = max(0, -offset), t - max(0, offset)
        if hi <= lo:
            continue
        entries = [h.double().numpy() for h in stream(ids)]
        last = len(entries) - 1
        entries = [normalize(h) if (e < last or fresh_last) else h for e, h in enumerate(entries)]
        feats = [[] for _ in entries] if feats is None else feats
        for bucket, h in zip(feats, entries, strict=True):
            bucket.append(h[lo:hi])
        targets.append(ids.numpy()[lo + offset : hi + offset])
    ids = np.concatenate(targets)
    y = ids.astype(np.float64) if target is None else target(ids)
    return np.array([ols_pr(np.concatenate(f), y) for f in feats])
