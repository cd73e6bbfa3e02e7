"""He & Su's protocol done literally on a model: the reference `measure` is checked against."""

from __future__ import annotations

import copy

import numpy as np
import torch

from lawwatch import ProbeSet
from tests.helpers.reference import ols_pr


def paper_reference(model, probe: ProbeSet, fresh_norm) -> np.ndarray:
    """The protocol, literally: a float64 copy of the model, one unpadded sequence at a time,
    a fresh norm module on every entry but the last, targets = next token ids, numpy lstsq."""
    m = copy.deepcopy(model).double().eval()
    feats, targets = None, []
    for row, mask in zip(probe.input_ids, probe.attention_mask, strict=True):
        ids = row[mask.bool()]
        if ids.numel() < 2:
            continue
        with torch.no_grad():
            hidden = m.base_model(ids[None], output_hidden_states=True).hidden_states
        per_entry = [fresh_norm(h[0, :-1]) for h in hidden[:-1]] + [hidden[-1][0, :-1]]
        feats = [[] for _ in per_entry] if feats is None else feats
        for bucket, h in zip(feats, per_entry, strict=True):
            bucket.append(h.numpy())
        targets.append(ids[1:].numpy())
    y = np.concatenate(targets).astype(np.float64)
    return np.array([ols_pr(np.concatenate(f), y) for f in feats])


def gpt2_norm(d):
    return torch.nn.LayerNorm(d, eps=1e-5, elementwise_affine=False).double()


def llama_norm(d):
    return torch.nn.RMSNorm(d, eps=1e-6, elementwise_affine=False).double()
