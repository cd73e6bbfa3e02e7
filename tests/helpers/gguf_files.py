"""GGUF files of tiny models, written as llama.cpp's converter writes them (needs ``gguf``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import GPT2LMHeadModel

# a byte-level BPE small enough for a tiny vocabulary: printable ASCII, then "th", "he", "the"
MERGES = ["t h", "h e", "th e"]


def byte_tokens(vocab_size: int) -> list[str]:
    """``vocab_size`` tokens: printable ASCII characters (their own byte-level form), merges."""
    tokens = [chr(c) for c in range(33, 127)] + ["th", "he", "the"]
    assert vocab_size <= len(tokens), "a vocabulary this small holds only these tokens"
    return tokens[:vocab_size]


def write_gguf(model: GPT2LMHeadModel, path: Path) -> Path:
    """A float32 GGUF of a GPT-2, with the tensor names and layout llama.cpp's converter uses."""
    gguf = pytest.importorskip("gguf")
    config = model.config
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_name("tiny-gpt2")
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(byte_tokens(config.vocab_size))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, config.n_layer)
    conv1d = (
        ".attn.c_attn.weight",
        ".attn.c_proj.weight",
        ".mlp.c_fc.weight",
        ".mlp.c_proj.weight",
    )
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding
            continue
        array = tensor.detach().float().numpy()
        if name.endswith(conv1d):  # GPT-2's Conv1D stores (in, out); GGUF holds (out, in)
            array = array.T
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), array.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
