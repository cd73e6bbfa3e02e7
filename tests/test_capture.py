"""Capture on every architecture: Hugging Face families from tiny random configs, and any
``torch.nn.Module`` with named blocks, each against an independent float64 reference."""

import copy
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lawwatch
from lawwatch import LawWatch, measure
from lawwatch.capture import Capture
from lawwatch.identify_norm import identify
from lawwatch.measurement import accumulate
from lawwatch.norms import NormSpec
from lawwatch.probe import example_mask
from tests.helpers.models import (
    FAMILIES,
    LAYERS,
    VOCAB,
    D,
    EpsInCodeLayerNorm,
    NanoGPT,
    build,
    ragged_probe,
)
from tests.helpers.reference import hf_residual_stream, layer_norm, protocol_pr, rms_norm

pytestmark = pytest.mark.usefixtures("one_thread")


def probe():
    return ragged_probe(seed=2, rows=14, max_len=24)


def batch(p):
    ids, mask = next(p.batches(len(p)))
    return ids, mask, example_mask(mask)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_blocks_and_final_norm_are_detected(family):
    model = build(family)
    _, _, _, norm_name, (kind, eps, offset), _ = FAMILIES[family]
    capture = Capture(model)
    assert len(capture.blocks) == LAYERS and capture.final_norm == norm_name
    assert capture.layers == (0, 1, 2, 3)
    capture(*batch(probe()))  # the reading is checked against the module's own output
    assert capture.spec.kind == kind and capture.spec.weight_offset == offset
    assert capture.spec.eps == pytest.approx(eps, rel=1e-12)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_entries_match_the_models_own_hidden_states(family):
    """Per family: the last HF hidden state is the final norm's output; the hooked
    entries are the model's residual stream (Mamba and RWKV: HF's tuple lacks the embeddings)."""
    model = build(family)
    norm_name, shifted = FAMILIES[family][3], FAMILIES[family][5]
    ids, mask, positions = batch(probe())
    seen = {}
    norm = model.get_submodule(norm_name)
    handle = norm.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        out = model.base_model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        handle.remove()
        own_norm = norm(seen["x"])
    hs = out.hidden_states
    assert len(hs) == LAYERS + 1
    torch.testing.assert_close(hs[-1], out.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(hs[-1], own_norm, rtol=0, atol=0)  # the final norm is applied

    got = Capture(model, "none")(ids, mask, positions)  # (4, n, d) float64, raw entries
    if shifted:
        with torch.no_grad():
            embeddings = model.base_model.get_input_embeddings()(ids)
        assert not torch.allclose(hs[0], embeddings)  # HF's first entry is block 1's output
        want = [embeddings, *hs[:-2]]
    else:
        want = list(hs[:-1])
    for entry, h in enumerate(want):
        torch.testing.assert_close(got[entry], h[positions].double(), rtol=0, atol=0)
    # the last entry: the final norm re-applied in float64 to its float32 input
    torch.testing.assert_close(got[-1], hs[-1][positions].double(), rtol=0, atol=2e-6)


def _fresh(kind, eps):
    return (lambda h: layer_norm(h, eps)) if kind == "layernorm" else (lambda h: rms_norm(h, eps))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_measure_equals_paper_protocol(family):
    """measure == He & Su's protocol done literally in float64 (HF hidden states, numpy norms
    and lstsq), for a float64 model and, to float32 rounding, for the float32 model."""
    model = build(family)
    (kind, eps, _), shifted = FAMILIES[family][4], FAMILIES[family][5]
    p = probe()
    assert p.num_examples() > 10 * D
    m64 = copy.deepcopy(model).double()
    want = protocol_pr(lambda ids: hf_residual_stream(m64, ids, shifted), p, _fresh(kind, eps))
    got = measure(m64, p, batch_size=5).pr.numpy()
    # the norms of Llama, Mistral, Qwen2, Mamba, Gemma compute in float32 even in a float64
    # model, so the model's own last entry (the reference's) carries float32 rounding
    # (measured: <= 4.1e-9; every other entry <= 3.3e-16)
    np.testing.assert_allclose(got[:-1], want[:-1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got[-1:], want[-1:], rtol=0, atol=2e-8)
    # float32 model: its residual stream rounds at ~1e-7 (measured: PR within 2.4e-8)
    got32 = measure(model, p, batch_size=16).pr.numpy()
    np.testing.assert_allclose(got32, want, rtol=0, atol=1e-7)


def test_rwkv_eval_rescaling_is_undone():
    """HF's RWKV divides weights by powers of two on an eval forward and multiplies them back
    on the next train forward; after a snapshot the weights must be as they were."""
    config_cls, model_cls, kwargs, *_ = FAMILIES["rwkv"]
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=VOCAB, **{**kwargs, "rescale_every": 1}))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure(model, probe())
    assert model.training and not model.rwkv.layers_are_rescaled
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_no_hooks_left_behind():
    model = build("llama")
    measure(model, probe())
    with pytest.raises(ValueError, match="Too few"):
        measure(model, ragged_probe(rows=2, max_len=4))
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


# -- any torch.nn.Module ----------------------------------------------------------------------


class MyRMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class ScaleNorm(nn.Module):
    """Neither a LayerNorm nor an RMSNorm: g * x / (||x|| + eps)."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(1.3))
        self.eps = eps

    def forward(self, x):
        return self.g * x / (x.norm(dim=-1, keepdim=True) + self.eps)


class HiddenEpsNorm(nn.Module):
    """A LayerNorm whose epsilon is not an attribute."""

    def __init__(self, d):
        super().__init__()
        self.d = d

    def forward(self, x):
        return F.layer_norm(x, (self.d,), eps=1e-5)


class HiddenEpsScaleNorm(nn.Module):
    """Neither a LayerNorm nor an RMSNorm, and no epsilon attribute: w * x / (||x|| + 1e-5)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.full((d,), 1.3))

    def forward(self, x):
        return self.weight * x / (x.norm(dim=-1, keepdim=True) + 1e-5)


class HiddenEpsGemmaRMSNorm(nn.Module):
    """An RMSNorm computing in float32, scale 1 + weight, its epsilon a literal in the code."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-0.3, 0.4, d))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


def nano_reference(model, p, fresh, fresh_last=False):
    """Entries written out by hand on a float64 copy: embeddings, each block's output, the
    final norm of the last (no lawwatch, no hooks)."""
    m = copy.deepcopy(model).double().eval()

    def stream(ids):
        with torch.no_grad():
            x = m.transformer.wte(ids[None]) + m.transformer.wpe(torch.arange(ids.numel()))
            entries = [x]  # (1, T, d) each
            for block in m.transformer.h:
                x = block(x)
                x = x[0] if isinstance(x, tuple) else x
                entries.append(x)
            if "ln_f" in m.transformer:
                entries[-1] = m.transformer.ln_f(entries[-1])
        return [e[0] for e in entries]

    return protocol_pr(stream, p, fresh, fresh_last=fresh_last)


def test_any_module_by_named_blocks():
    model = NanoGPT()
    p = probe()
    want = nano_reference(model, p, lambda h: layer_norm(h, 1e-5))
    h = model.transformer.h
    variants = [
        {"blocks": "transformer.h.*", "final_norm": "transformer.ln_f"},
        {"blocks": "transformer.h", "final_norm": model.transformer.ln_f},
        {"blocks": re.compile(r"transformer\.h\.\d+")},  # final norm found by its name
        {"blocks": [f"transformer.h.{i}" for i in range(LAYERS)]},
        {"blocks": h},
    ]
    for kwargs in variants:
        got = measure(model, p, batch_size=4, **kwargs).pr.numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7, err_msg=str(kwargs))
    assert model.training  # mode restored; the model's forward ran with its LM head


def test_tuple_blocks_and_a_custom_rmsnorm():
    model = NanoGPT(norm=MyRMSNorm, tuple_out=True)
    p = probe()
    want = nano_reference(model, p, lambda h: rms_norm(h, 1e-6))
    capture = Capture(model, blocks="transformer.h.*")
    capture(*batch(p))
    assert capture.spec == NormSpec("rmsnorm", 1e-6)  # read off the module: its name and eps
    got = measure(model, p, blocks="transformer.h.*").pr.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)


def test_model_without_final_norm_takes_a_normspec():
    model = NanoGPT(final=False)
    p = probe()
    spec = NormSpec("layernorm", 1e-5)
    want = nano_reference(model, p, lambda h: layer_norm(h, 1e-5), fresh_last=True)
    got = measure(model, p, blocks="transformer.h.*", final_norm=spec).pr.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match=r"Cannot tell the final norm.*NormSpec"):
        measure(model, p, blocks="transformer.h.*")


def test_errors_say_what_to_pass():
    model, p = NanoGPT(), probe()
    with pytest.raises(ValueError, match=r"Pass blocks=.*transformer\.h \(3\)"):
        measure(model, p)
    with pytest.raises(ValueError, match=r"matches no module.*transformer\.h \(3\)"):
        measure(model, p, blocks="transformer.blocks.*")
    with pytest.raises(ValueError, match="lies inside it"):
        measure(model, p, blocks=re.compile(r"transformer\.h\.\d+(\.attn)?"))
    backwards = [f"transformer.h.{i}" for i in reversed(range(LAYERS))]
    with pytest.raises(RuntimeError, match="ran in the order"):
        measure(model, p, blocks=backwards)
    with pytest.raises(RuntimeError, match="ran 2 times"):
        measure(NanoGPT(final_twice=True), p, blocks="transformer.h")
    with pytest.raises(TypeError, match=r"behaves like no LayerNorm or RMSNorm.*NormSpec"):
        measure(NanoGPT(norm=ScaleNorm), p, blocks="transformer.h")
    with pytest.raises(TypeError, match=r"keeps its epsilon in its code.*did not identify"):
        measure(NanoGPT(norm=HiddenEpsScaleNorm), p, blocks="transformer.h")
    with pytest.raises(ValueError, match="not a module"):
        measure(model, p, blocks="transformer.h", final_norm="transformer.norm")
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_a_norm_that_keeps_its_epsilon_in_code_is_identified():
    """No eps attribute: the final norm is run on chosen inputs, its kind and epsilon read off
    its outputs, and the reading checked on every batch; PR as the float64 reference's."""
    model, p = NanoGPT(norm=HiddenEpsNorm), probe()  # no weight: identified at the first batch
    capture = Capture(model, blocks="transformer.h.*")
    capture(*batch(p))
    assert capture.spec == NormSpec("layernorm", 1e-5)
    want = nano_reference(model, p, lambda h: layer_norm(h, 1e-5))
    got = measure(model, p, blocks="transformer.h.*").pr.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("make", "want"),
    [
        (lambda d: EpsInCodeLayerNorm(d, bias=True), NormSpec("layernorm", 1e-5)),
        (lambda d: EpsInCodeLayerNorm(d + 1, bias=False), NormSpec("layernorm", 1e-5)),
        (HiddenEpsGemmaRMSNorm, NormSpec("rmsnorm", 1e-6, 1.0)),
    ],
)
def test_identified_exactly_in_every_dtype_without_touching_the_model(make, want, dtype):
    norm = make(D)
    with torch.no_grad():
        for name, param in norm.named_parameters():
            param.uniform_(-0.2, 0.2) if name == "bias" else param.add_(0.1)
    norm = norm.to(dtype)
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    rng = torch.get_rng_state()
    dim = norm.weight.shape[0]
    assert identify(norm, "ln_f", dim, dtype, torch.device("cpu")) == want
    assert torch.equal(torch.get_rng_state(), rng)  # the training's RNG stream is untouched
    for key, value in norm.state_dict().items():
        assert torch.equal(value, before[key])


def test_a_norm_that_cannot_be_identified_is_refused_when_the_monitor_is_built():
    model = NanoGPT(norm=HiddenEpsScaleNorm)
    with pytest.raises(TypeError, match=r"'transformer\.ln_f' \(HiddenEpsScaleNorm\).*\.eps = "):
        LawWatch(model, probe(), blocks="transformer.h")
    assert lawwatch.NormSpec is NormSpec  # the fix the message names is importable as written


def test_hf_model_with_a_final_norm_it_cannot_read():
    model = build("gpt2")
    model.transformer.ln_f = ScaleNorm(D)
    with pytest.raises(TypeError, match="NormSpec"):
        measure(model, probe())
    # the explicit way out: treat the model as having no final norm module
    other = measure(model, probe(), final_norm=NormSpec("layernorm", 1e-5))
    assert other.pr.shape == (LAYERS + 1,)


def test_bf16_model_reading_and_pr():
    """A bf16 model: the final norm's reading still verifies against its bf16 output, and PR
    stays near the float64 model's (bf16 rounds the stream itself at ~4e-3)."""
    model = build("llama")
    p = probe()
    want = measure(copy.deepcopy(model).double(), p).pr
    got = measure(model.to(torch.bfloat16), p).pr
    # bf16 keeps 8 bits of mantissa: the stream itself is off by up to 2^-8 (measured: 7e-4)
    assert (got - want).abs().max() < 2**-7


def test_hf_blocks_can_be_named_explicitly():
    model, p = build("mistral"), probe()
    auto = accumulate(model, p, layers=[0, 1, 2])  # the final norm's reading is still needed
    named = accumulate(model, p, blocks="model.layers.*", final_norm="model.norm", layers=[0, 1, 2])
    torch.testing.assert_close(named.compute(), auto.compute(), rtol=0, atol=0)
    torch.testing.assert_close(auto.compute(), measure(model, p).pr[:3], rtol=0, atol=1e-12)
