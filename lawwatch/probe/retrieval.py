"""A synthetic retrieval probe: k key–value passages, a question about one, its answer marked.

The design of Kongmanee's logit-lens study of multi-document question answering (arXiv
2501.15054), made from any tokenizer: each context holds ``passages`` passages ``"The code of
<key> is <value>."`` (distinct keys, distinct values), then ``"Question: what is the code of
<key>? Answer: <value>"`` about one of them. The *answer* (the value after ``Answer:``) is
the probe's target (:attr:`~lawwatch.probe.ProbeSet.target_mask`): only the examples that
predict its tokens count; the whole context still runs through the model. Each sequence's
group is where the queried passage sits: ``"beginning"``, ``"middle"``, ``"end"`` (or
``position_0`` … for another count of positions).

**Vocabulary.** Keys are drawn from :data:`KEYS` (common English nouns), values are the
two-digit numbers 10 … 99: a value is one token in GPT-2's byte-level BPE (``" 42"``) and two
in tokenizers that split digits (Llama, Mistral); every token overlapping the value is marked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lawwatch.probe.set import ProbeSet

__all__ = [
    "KEYS",
    "POSITIONS",
    "VALUES",
    "RetrievalItem",
    "position_names",
    "queried_index",
    "retrieval_probe",
    "retrieval_texts",
]

KEYS: tuple[str, ...] = (
    "apple", "river", "tiger", "violin", "garden", "silver", "rocket", "candle", "forest",
    "harbor", "pencil", "mirror", "island", "dragon", "castle", "meadow", "lantern", "falcon",
    "copper", "glacier", "orchard", "compass", "thunder", "velvet", "canyon", "marble",
    "puzzle", "saddle", "walnut", "beacon",
)  # fmt: skip
"""The keys a context's passages are about (a context draws ``passages`` distinct ones)."""
VALUES: tuple[str, ...] = tuple(str(v) for v in range(10, 100))
"""The values: two-digit numbers (a context draws ``passages`` distinct ones)."""
POSITIONS: tuple[str, ...] = ("beginning", "middle", "end")
"""The group names of the default three positions of the queried passage."""


@dataclass(frozen=True)
class RetrievalItem:
    """One context of the retrieval probe.

    Attributes:
        text: The passages, the question and the answer.
        answer: ``(start, end)`` the answer's characters in ``text`` (its last characters).
        group: Where the queried passage sits (its position group's name).
        queried: The queried passage's index among the passages (0 = first).
        key: The key asked about.
        value: The answer.
    """

    text: str
    answer: tuple[int, int]
    group: str
    queried: int
    key: str
    value: str


def position_names(positions: int) -> tuple[str, ...]:
    """The group names of ``positions`` positions: :data:`POSITIONS` for 3, else ``position_i``."""
    if positions == 3:
        return POSITIONS
    return tuple(f"position_{i}" for i in range(positions))


def queried_index(position: int, positions: int, passages: int) -> int:
    """The passage asked about at position ``position`` of ``positions``: evenly spread.

    ``round(position · (passages − 1) / (positions − 1))`` (halves up): the first passage at
    position 0, the last at the last position; distinct for ``passages >= positions``.
    """
    steps = positions - 1
    return (2 * position * (passages - 1) + steps) // (2 * steps)


def retrieval_texts(
    *,
    passages: int = 5,
    per_position: int = 8,
    positions: int = 3,
    seed: int = 0,
) -> list[RetrievalItem]:
    """The contexts of the retrieval probe, ``per_position`` per position, grouped in order.

    Deterministic by ``seed`` (one :class:`random.Random` draws every context's keys, values and
    queried key).

    Args:
        passages: Key–value passages per context (``k``).
        per_position: Contexts per position of the queried passage.
        positions: Positions of the queried passage, evenly spread over the passages
            (:func:`queried_index`); 3 names them beginning, middle, end.
        seed: The draw's seed.

    Raises:
        ValueError: Fewer passages than positions (no passage strictly between the first and
            the last for ``middle``), more passages than :data:`KEYS`, fewer than 2 positions,
            no context.
    """
    for name, value in (("passages", passages), ("per_position", per_position)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if not isinstance(positions, int) or isinstance(positions, bool) or positions < 2:
        raise ValueError(
            f"positions must be an int of at least 2 (beginning and end), got {positions!r}."
        )
    if passages < positions:
        raise ValueError(
            f"passages={passages} cannot place the queried passage at {positions} distinct "
            f"positions ({', '.join(position_names(positions))}): 'middle' needs a passage "
            f"strictly between the first and the last. Use passages >= {positions}."
        )
    if passages > len(KEYS):
        raise ValueError(
            f"passages={passages}, but the probe has {len(KEYS)} distinct keys: use at most "
            f"{len(KEYS)} passages."
        )
    rng = random.Random(seed)
    names = position_names(positions)
    items = []
    for p, group in enumerate(names):
        queried = queried_index(p, positions, passages)
        for _ in range(per_position):
            keys = rng.sample(KEYS, passages)
            values = rng.sample(VALUES, passages)
            pairs = zip(keys, values, strict=True)
            context = " ".join(f"The code of {k} is {v}." for k, v in pairs)
            key, value = keys[queried], values[queried]
            text = f"{context} Question: what is the code of {key}? Answer: {value}"
            answer = (len(text) - len(value), len(text))
            items.append(RetrievalItem(text, answer, group, queried, key, value))
    return items


def retrieval_probe(
    tokenizer: Any,
    *,
    passages: int = 5,
    per_position: int = 8,
    positions: int = 3,
    seed: int = 0,
    max_length: int | None = None,
) -> ProbeSet:
    """The retrieval probe tokenized by ``tokenizer``: groups by position, the answers marked.

    Each context of :func:`retrieval_texts` is one sequence (no special tokens); its group is
    the queried passage's position, its :attr:`~lawwatch.probe.ProbeSet.target_mask` marks the
    tokens overlapping the answer (the value after ``Answer:``). ``meta["retrieval"]`` keeps the
    options and, per sequence, the queried passage's index.

    Args:
        tokenizer: A *fast* Hugging Face tokenizer (the answer is found by character offsets).
        passages: Key–value passages per context.
        per_position: Contexts per position.
        positions: Positions of the queried passage (3: beginning, middle, end).
        seed: The draw's seed.
        max_length: The longest sequence allowed; default the longest context's tokens. A
            context longer than it is refused (truncating would cut the answer off).

    Raises:
        ValueError: A tokenizer without character offsets, a ``max_length`` shorter than a
            context, or what :func:`retrieval_texts` refuses.
    """
    from lawwatch.probe.set import ProbeSet

    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"The retrieval probe marks the answer's tokens by character offsets, which need a "
            f"fast tokenizer; {type(tokenizer).__name__} has none. Load it with "
            "AutoTokenizer.from_pretrained(name, use_fast=True) (or a tokenizers-backed "
            "PreTrainedTokenizerFast)."
        )
    items = retrieval_texts(
        passages=passages, per_position=per_position, positions=positions, seed=seed
    )
    texts = [item.text for item in items]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    longest = max(lengths)
    if max_length is None:
        max_length = longest
    elif longest > max_length:
        raise ValueError(
            f"max_length={max_length} is too short for the retrieval probe: its longest context "
            f"takes {longest} tokens, and truncating it would cut the answer off. Raise "
            f"max_length to at least {longest} or use fewer passages (passages={passages})."
        )
    probe = ProbeSet.from_texts(
        texts,
        tokenizer,
        max_length=max_length,
        seed=seed,
        groups=[item.group for item in items],
        target_spans=[[item.answer] for item in items],
    )
    probe.meta["source"] = "retrieval"
    probe.meta["retrieval"] = {
        "passages": passages,
        "per_position": per_position,
        "positions": list(position_names(positions)),
        "queried": [item.queried for item in items],
    }
    return probe
