"""Tiny real models built from explicit configs (no hub), and the probes the tests measure."""

from __future__ import annotations

import warnings

import torch
import transformers as tf
from torch import nn
from torch.nn import functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lawwatch import ProbeSet

VOCAB = 97
# what every history record (Snapshot.to_record, history.jsonl) holds at least (issue 3)
RECORD_KEYS = {"step", "pr", "rho", "pearson_r", "slope", "intercept", "r2", "n_tokens", "seconds"}


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=16,
        n_layer=4,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        **overrides,
    )
    model = GPT2LMHeadModel(config)
    # a misspelled config field would silently give a full-size model
    assert sum(p.numel() for p in model.parameters()) < 50_000
    return model


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **overrides,
    )
    model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) < 50_000
    return model


def ragged_probe(seed: int = 0, rows: int = 12, max_len: int = 24) -> ProbeSet:
    """Right-padded sequences of different lengths (some of length 1: no example)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (rows,), generator=gen).tolist()
    lengths[0], lengths[1] = max_len, 1
    seqs = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    with warnings.catch_warnings():  # the length-1 row is deliberate
        warnings.simplefilter("ignore")
        return ProbeSet.from_tokens(seqs)


def char_tokenizer():
    """A small byte-level BPE trained here (no hub), wrapped as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the law of equi-learning", "each layer cuts the residual", "by the same factor"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


D, LAYERS = 16, 3
_ATTN = {"num_attention_heads": 2, "max_position_embeddings": 64}
# family: (config class, model class, config kwargs, final norm name, its (kind, eps, offset),
#          HF hidden_states without the embeddings). Epsilons are unusual on purpose, so the
# detected ones are read off the model; the expected ones come from the config fields.
FAMILIES = {
    "gpt2": (
        tf.GPT2Config,
        tf.GPT2LMHeadModel,
        {
            "n_embd": D,
            "n_layer": LAYERS,
            "n_head": 2,
            "n_positions": 64,
            "layer_norm_epsilon": 3e-4,
        },
        "transformer.ln_f",
        ("layernorm", 3e-4, 0.0),
        False,
    ),
    "llama": (
        tf.LlamaConfig,
        tf.LlamaForCausalLM,
        {
            "hidden_size": D,
            "intermediate_size": 32,
            "num_hidden_layers": LAYERS,
            **_ATTN,
            "num_key_value_heads": 1,
            "rms_norm_eps": 2e-5,
        },
        "model.norm",
        ("rmsnorm", 2e-5, 0.0),
        False,
    ),
    "mistral": (
        tf.MistralConfig,
        tf.MistralForCausalLM,
        {
            "hidden_size": D,
            "intermediate_size": 32,
            "num_hidden_layers": LAYERS,
            **_ATTN,
            "num_key_value_heads": 1,
            "rms_norm_eps": 3e-6,
            "sliding_window": 8,
        },
        "model.norm",
        ("rmsnorm", 3e-6, 0.0),
        False,
    ),
    "qwen2": (
        tf.Qwen2Config,
        tf.Qwen2ForCausalLM,
        {
            "hidden_size": D,
            "intermediate_size": 32,
            "num_hidden_layers": LAYERS,
            **_ATTN,
            "num_key_value_heads": 1,
            "rms_norm_eps": 4e-6,
        },
        "model.norm",
        ("rmsnorm", 4e-6, 0.0),
        False,
    ),
    "gpt_neox": (
        tf.GPTNeoXConfig,
        tf.GPTNeoXForCausalLM,
        {
            "hidden_size": D,
            "intermediate_size": 32,
            "num_hidden_layers": LAYERS,
            **_ATTN,
            "layer_norm_eps": 2e-4,
        },
        "gpt_neox.final_layer_norm",
        ("layernorm", 2e-4, 0.0),
        False,
    ),
    "phi": (
        tf.PhiConfig,
        tf.PhiForCausalLM,
        {
            "hidden_size": D,
            "intermediate_size": 32,
            "num_hidden_layers": LAYERS,
            **_ATTN,
            "layer_norm_eps": 5e-5,
        },
        "model.final_layernorm",
        ("layernorm", 5e-5, 0.0),
        False,
    ),
    "mamba": (
        tf.MambaConfig,
        tf.MambaForCausalLM,
        {
            "hidden_size": D,
            "state_size": 4,
            "num_hidden_layers": LAYERS,
            "expand": 2,
            "conv_kernel": 4,
            "layer_norm_epsilon": 3e-5,
        },
        "backbone.norm_f",
        ("rmsnorm", 3e-5, 0.0),
        True,
    ),
    "rwkv": (
        tf.RwkvConfig,
        tf.RwkvForCausalLM,
        # rescale_every=0: HF's RWKV halves the stream every k blocks in eval mode only
        {
            "hidden_size": D,
            "num_hidden_layers": LAYERS,
            "attention_hidden_size": D,
            "intermediate_size": 32,
            "context_length": 64,
            "rescale_every": 0,
            "layer_norm_epsilon": 3e-4,
        },
        "rwkv.ln_out",
        ("layernorm", 1e-5, 0.0),  # ln_out is nn.LayerNorm(hidden_size): the default eps
        True,
    ),
    # other causal LMs: Gemma's (1 + weight) RMSNorm, OPT's nested decoder with a LayerNorm
    # without weights, Falcon's hand-written hidden-state loop
    "gemma": (
        tf.GemmaConfig,
        tf.GemmaForCausalLM,
        {
            "hidden_size": D,
            "intermediate_size": 32,
            "num_hidden_layers": LAYERS,
            **_ATTN,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "rms_norm_eps": 7e-6,
        },
        "model.norm",
        ("rmsnorm", 7e-6, 1.0),
        False,
    ),
    "opt": (
        tf.OPTConfig,
        tf.OPTForCausalLM,
        {
            "hidden_size": D,
            "ffn_dim": 32,
            "num_hidden_layers": LAYERS,
            **_ATTN,
            "word_embed_proj_dim": D,
            "layer_norm_elementwise_affine": False,
        },
        "model.decoder.final_layer_norm",
        ("layernorm", 1e-5, 0.0),  # nn.LayerNorm default
        False,
    ),
    "falcon": (
        tf.FalconConfig,
        tf.FalconForCausalLM,
        {
            "hidden_size": D,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": 2,
            "layer_norm_epsilon": 6e-5,
        },
        "transformer.ln_f",
        ("layernorm", 6e-5, 0.0),
        False,
    ),
}


def build(family: str, seed: int = 0) -> nn.Module:
    config_cls, model_cls, kwargs, norm_name, *_ = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, **kwargs)
    model = model_cls(config)
    # a misspelled config field would silently give a full-size model
    assert sum(p.numel() for p in model.parameters()) < 40_000
    assert config.num_hidden_layers == LAYERS
    # trained-looking final-norm parameters, so re-applying them is actually tested
    norm = model.get_submodule(norm_name)
    with torch.no_grad():
        for name, p in norm.named_parameters():
            p.uniform_(-0.2, 0.2) if name == "bias" or family == "gemma" else p.uniform_(0.5, 1.5)
    return model.eval()


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for z in self.qkv(x).split(d, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, heads, t, d/heads)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d, norm, tuple_out):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = norm(d), Attention(d, 2), norm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.tuple_out = tuple_out

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return (x, {"aux": None}) if self.tuple_out else x


class NanoGPT(nn.Module):
    """nanoGPT's shape: transformer.{wte, wpe, h, ln_f}, lm_head; forward(idx) -> logits."""

    def __init__(self, norm=nn.LayerNorm, final=True, tuple_out=False, final_twice=False):
        super().__init__()
        torch.manual_seed(0)
        parts = {
            "wte": nn.Embedding(VOCAB, D),
            "wpe": nn.Embedding(32, D),
            "h": nn.ModuleList(Block(D, norm, tuple_out) for _ in range(LAYERS)),
        }
        if final:
            parts["ln_f"] = norm(D)
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.final_twice = final_twice
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "ln" in name and p.ndim == 1:
                    p.uniform_(0.5, 1.5)
        assert sum(p.numel() for p in self.parameters()) < 20_000

    def forward(self, idx):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1]))
        for block in self.transformer.h:
            x = block(x)
            x = x[0] if isinstance(x, tuple) else x
        if "ln_f" in self.transformer:
            x = self.transformer.ln_f(x)
            if self.final_twice:
                x = self.transformer.ln_f(x)
        return self.lm_head(x)


class EpsInCodeLayerNorm(nn.Module):
    """A LayerNorm as nanoGPT's ``model.py`` writes it: a weight, an optional bias, and its
    epsilon (1e-5) a literal in the forward, so the module has no ``eps`` to read."""

    def __init__(self, ndim: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


def nanogpt_eps_in_code(vocab_size: int = VOCAB, bias: bool = False, seed: int = 0) -> nn.Module:
    """The nanoGPT recipe's GPT (nanoGPT's layout, ``config.n_layer``) with every LayerNorm
    replaced by :class:`EpsInCodeLayerNorm` (trained-looking weights and biases), as nanoGPT's own
    ``train.py`` builds it (``bias=False`` is its default config)."""
    from tests.helpers.recipes import recipe

    gpt = recipe("pretrain_nanogpt")
    torch.manual_seed(seed)
    model = gpt.GPT(gpt.GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=4, n_embd=16))
    for parent in [model.transformer, *model.transformer.h]:
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                norm = EpsInCodeLayerNorm(child.normalized_shape[0], bias=bias)
                with torch.no_grad():
                    norm.weight.uniform_(0.5, 1.5)
                    if norm.bias is not None:
                        norm.bias.uniform_(-0.2, 0.2)
                setattr(parent, name, norm)
    return model


def plain_layernorm_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`EpsInCodeLayerNorm` replaced by the
    ``nn.LayerNorm(eps=1e-5)`` holding the same weight and bias."""
    import copy

    plain = copy.deepcopy(model)
    for parent in list(plain.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, EpsInCodeLayerNorm):
                norm = nn.LayerNorm(child.weight.shape[0], eps=1e-5, bias=child.bias is not None)
                norm.load_state_dict(child.state_dict())
                setattr(parent, name, norm.to(child.weight.dtype))
    return plain


UNSOLVABLE_SPLIT = 0.3
"""The ``split`` to measure :func:`unsolvable_probe` with."""


def unsolvable_probe(rows: int = 8, length: int = 40, seed: int = 0) -> ProbeSet:
    """A probe every check accepts and every solve refuses, at ``split=UNSOLVABLE_SPLIT``.

    The sequences the split holds out (``frac(i·0.618…) < split``) repeat one token, the
    others are random: the targets vary over the whole probe (so the monitor is built), but
    the held-out part's take a single value, so each snapshot's out-of-sample solve fails.
    """
    from lawwatch.stats.partition import GOLDEN

    gen = torch.Generator().manual_seed(seed)
    tokens = []
    for i in range(rows):
        held_out = (i * GOLDEN) % 1.0 < UNSOLVABLE_SPLIT
        row = [7] * length if held_out else torch.randint(1, VOCAB, (length,), generator=gen)
        tokens.append([int(t) for t in row])
    return ProbeSet.from_tokens(tokens)
