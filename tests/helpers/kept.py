"""The reference the streamed capture is checked against: every entry of a batch kept at once.

Hooks of its own on the blocks and the final norm keep each measured entry's hidden state (in
the model's dtype) for the whole forward; the float64 features are made afterwards, all entries
together, with the same normalization and the final norm's reading of the ``Capture`` (its
``spec``, read by its calibration). This was the library's own path for the grouped measures
before they streamed; it stays here as an independent check of the streamed one.
"""

from __future__ import annotations

import torch

from lawwatch.capture import Capture
from lawwatch.norms import normalizer


def _tensor(value):
    if isinstance(value, (tuple, list)):
        value = value[0]
    return value


def kept_features(
    capture: Capture,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    normalize: str = "auto",
) -> torch.Tensor:
    """``(len(layers), n, d)`` float64 features of one batch, every entry kept together.

    For Hugging Face models whose hidden states are the hooks' entries (not Mamba or RWKV with
    ``entries="hidden_states"``); ``normalize`` as the capture was built with.
    """
    model = capture.model
    capture.calibrate(input_ids, attention_mask, positions)  # the final norm's reading
    kept: dict[int, torch.Tensor] = {}
    norm: dict[str, object] = {}
    blocks = [model.get_submodule(name) for name in capture.blocks]
    named = isinstance(capture.final_norm, str)
    norm_module = model.get_submodule(capture.final_norm) if named else None

    def first_input(_m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        kept[0] = x.detach()[positions]

    def output(i):
        def hook(_m, _args, out):
            kept[i + 1] = _tensor(out).detach()[positions]

        return hook

    def norm_input(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        norm["x"] = x.detach()[positions].to(torch.float64)
        norm["params"] = tuple(
            None if p is None else p.detach().to(torch.float64)
            for p in (getattr(module, "weight", None), getattr(module, "bias", None))
        )

    handles = [blocks[0].register_forward_pre_hook(first_input, with_kwargs=True)]
    handles += [b.register_forward_hook(output(i)) for i, b in enumerate(blocks)]
    if norm_module is not None:
        handles.append(norm_module.register_forward_pre_hook(norm_input, with_kwargs=True))
    try:
        with torch.no_grad():
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask.long()}
            model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    last = len(blocks)
    fresh = normalizer(normalize, capture.spec)
    out = []
    for entry in capture.layers:
        if entry == last and norm_module is not None:
            out.append(capture.spec.apply(norm["x"], *norm["params"]))  # the model's own norm
        else:
            out.append(fresh(kept[entry].to(torch.float64)))
    return torch.stack(out)
