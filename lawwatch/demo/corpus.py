"""Training text without a hub: what every CPython ships, a tokenizer, packed blocks.

No model or dataset hub is needed: the demo trains on the documentation topics in
``pydoc_data.topics`` (~0.47 MB) and the docstrings of the standard library's modules (~3 MB,
read with ``ast`` — nothing is imported or executed). This module turns documents into training
data: split them, train a byte-level BPE on them, and pack the tokenized documents into
fixed-length causal-LM blocks. The demo owns it; the recipes, benches and tests borrow it, and
the library never imports it.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path
from typing import Any, Literal

import torch

Source = Literal["topics", "docstrings", "all"]


def pydoc_topics() -> list[str]:
    """The ~80 documentation topics of ``pydoc_data.topics``, one text each, in key order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def stdlib_docstrings(min_chars: int = 200) -> list[str]:
    """Module, class and function docstrings of the standard library's ``.py`` files.

    Files are parsed, never imported. Order is deterministic (sorted paths, source order).

    Args:
        min_chars: Skip docstrings shorter than this.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue  # a few stdlib files are deliberately invalid (lib2to3 fixtures, …)
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    texts.append(doc)
    return texts


def python_license() -> list[str]:
    """The paragraphs of the license text CPython ships (``LICENSE.txt`` beside the stdlib).

    Legal prose, unlike anything the demo trains on: the demo's per-group probe sets it
    against the pydoc topics (``DemoConfig.probe_groups``).

    Raises:
        FileNotFoundError: This Python was installed without its ``LICENSE.txt``.
    """
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"This Python ships no license text at {path} (some distributions leave it out); "
            "the demo's per-group probe needs it: run the demo without --probe-groups."
        )
    blocks = path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n\n")
    return [" ".join(b.split()) for b in blocks if len(b.split()) >= 8]


def python_texts(source: Source = "all") -> list[str]:
    """Documents from the running CPython: ``"topics"``, ``"docstrings"`` or ``"all"``."""
    if source == "topics":
        return pydoc_topics()
    if source == "docstrings":
        return stdlib_docstrings()
    if source == "all":
        return pydoc_topics() + stdlib_docstrings()
    raise ValueError(f"Unknown source {source!r}; choose 'topics', 'docstrings' or 'all'.")


def split_texts(
    texts: list[str], heldout: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Shuffle deterministically and split into (train, held-out) documents.

    Args:
        texts: The documents.
        heldout: Fraction held out (for the probe set), in (0, 1).
        seed: Seed of the shuffle.
    """
    if not 0.0 < heldout < 1.0:
        raise ValueError(f"heldout must lie in (0, 1), got {heldout}.")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(len(texts) * heldout))
    if cut >= len(texts):
        raise ValueError(f"{len(texts)} documents are too few to hold out {heldout:.0%}.")
    return [texts[i] for i in order[cut:]], [texts[i] for i in order[:cut]]


def train_tokenizer(texts: list[str], vocab_size: int = 4096) -> Any:
    """A byte-level BPE trained here on ``texts``, as a ``PreTrainedTokenizerFast``.

    Like GPT-2's, ids grow roughly with merge order (frequent pieces first), which matters for
    the paper's scalar token-id target. The end-of-text token ``<|endoftext|>`` is id 0 and
    doubles as the pad token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def pack(docs: list[list[int]], eos_id: int, seq_len: int) -> torch.Tensor:
    """Concatenate documents, each followed by ``eos_id``, and cut into ``seq_len`` blocks.

    Args:
        docs: Token ids, one list per document.
        eos_id: The end-of-text id written after every document.
        seq_len: Tokens per block.

    Returns:
        ``(blocks, seq_len)`` int64; the tail shorter than a block is dropped.

    Raises:
        ValueError: The documents give fewer tokens than one block.
    """
    stream = torch.tensor([t for doc in docs for t in [*doc, eos_id]], dtype=torch.long)
    blocks = stream.numel() // seq_len
    if blocks == 0:
        raise ValueError(
            f"The training text gives {stream.numel()} tokens, fewer than one block of "
            f"seq_len={seq_len}; use more text (source='all') or a shorter seq_len."
        )
    return stream[: blocks * seq_len].view(blocks, seq_len)


def pack_texts(texts: list[str], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Tokenize ``texts`` (no special tokens added) and :func:`pack` them, separated by EOS.

    Args:
        texts: The training documents.
        tokenizer: A Hugging Face tokenizer with an ``eos_token_id``.
        seq_len: Tokens per block.

    Returns:
        ``(blocks, seq_len)`` int64 token ids.
    """
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return pack(ids, tokenizer.eos_token_id, seq_len)


class Blocks(torch.utils.data.Dataset):
    """Causal-LM training examples for the ``Trainer``: one packed block each, labels = inputs.

    Args:
        ids: ``(blocks, seq_len)`` token ids, as :func:`pack` returns them.
    """

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}
