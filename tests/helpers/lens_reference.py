"""The logit lens done literally: full float64 logits of every entry, every metric by definition.

Independent of lawwatch: the raw hidden states come from the model's own
``output_hidden_states`` (and a hook on the final norm for the last one, which Hugging Face
returns normalized), the final norm and the head are applied in numpy float64, and the
examples are chosen by the lens's rule written out as a loop.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def chosen(mask: np.ndarray, fraction: float) -> list[tuple[int, int]]:
    """(sequence, position) of the examples the lens reads, by its rule, in row-major order."""
    phi = (math.sqrt(5) - 1) / 2
    out = []
    for s in range(mask.shape[0]):
        p = 0
        for j in range(mask.shape[1] - 1):
            if not (mask[s, j] and mask[s, j + 1]):
                continue
            phase = (s * phi) % 1.0
            if fraction >= 1 or math.floor((p + 1) * fraction + phase) > math.floor(
                p * fraction + phase
            ):
                out.append((s, j))
            p += 1
    return out


def _final_norm(model, x: np.ndarray) -> np.ndarray:
    """The model's final norm in float64 (GPT-2's LayerNorm, Llama's RMSNorm)."""
    base = model.base_model
    norm = base.ln_f if hasattr(base, "ln_f") else base.norm
    w = norm.weight.detach().double().numpy()
    if hasattr(base, "ln_f"):
        c = x - x.mean(axis=-1, keepdims=True)
        y = c / np.sqrt((c**2).mean(axis=-1, keepdims=True) + norm.eps)
        return y * w + norm.bias.detach().double().numpy()
    eps = norm.variance_epsilon
    return x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + eps) * w


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=-1, keepdims=True)
    return z - (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))


def lens_reference(model, probe, fraction: float = 1.0, layers=None, rows=None) -> dict:
    """Every lens metric of ``model`` on ``probe`` by definition (see :func:`chosen`).

    ``rows``: the (sequence, position) examples to read instead of :func:`chosen`'s.
    """
    base = model.base_model
    norm = base.ln_f if hasattr(base, "ln_f") else base.norm
    model.eval()  # no dropout
    captured = {}
    handle = norm.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
    with torch.no_grad():
        out = model(
            probe.input_ids, attention_mask=probe.attention_mask.long(), output_hidden_states=True
        )
    handle.remove()
    states = [h.double().numpy() for h in out.hidden_states[:-1]]
    states.append(captured["x"].double().numpy())  # the last: before the final norm
    entries = list(range(len(states))) if layers is None else list(layers)
    mask = probe.attention_mask.numpy().astype(bool)
    ids = probe.input_ids.numpy()
    rows = chosen(mask, fraction) if rows is None else list(rows)
    s, j = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    target = ids[s, j + 1]
    head = model.get_output_embeddings()
    w = head.weight.detach().double().numpy()
    b = head.bias.detach().double().numpy() if head.bias is not None else 0.0

    def logp(x):
        return _log_softmax(_final_norm(model, x[s, j]) @ w.T + b)

    final = logp(states[-1])
    pf = np.exp(final)
    tops, result = [], {"top1": [], "ce": [], "kl": [], "entropy": []}
    for e in entries:
        lp = logp(states[e])
        top = lp.argmax(axis=1)
        tops.append(top)
        result["top1"].append(float((top == target).mean()))
        result["ce"].append(float(-lp[np.arange(len(target)), target].mean()))
        result["kl"].append(float((pf * (final - lp)).sum(axis=1).mean()))
        result["entropy"].append(float(-(np.exp(lp) * lp).sum(axis=1).mean()))
    final_top = final.argmax(axis=1)
    n_e = len(entries)
    first_hist, final_hist = [0] * (n_e + 1), [0] * (n_e + 1)
    firsts, finals, gaps = [], [], []
    for k in range(len(target)):
        first = next((i for i in range(n_e) if tops[i][k] == target[k]), n_e)
        fin = n_e
        for i in range(n_e - 1, -1, -1):
            if tops[i][k] != final_top[k]:
                break
            fin = i
        first_hist[first] += 1
        final_hist[fin] += 1
        if first < n_e:
            firsts.append(entries[first])
        if fin < n_e:
            finals.append(entries[fin])
        if first < n_e and fin < n_e:
            gaps.append(entries[fin] - entries[first])
    result.update(
        examples=len(target),
        first_correct=first_hist,
        final=final_hist,
        first_correct_mean=float(np.mean(firsts)) if firsts else None,
        final_mean=float(np.mean(finals)) if finals else None,
        gap_mean=float(np.mean(gaps)) if gaps else None,
    )
    return result
