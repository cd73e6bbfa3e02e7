"""ProbeSet: the fixed, held-out token sequences the law is measured on.

A probe set is a right-padded ``(sequences, length)`` tensor of token ids with an attention
mask. An *example* is a real position ``j`` whose partner ``j + offset`` (the next token by
default) is also real: the feature is the hidden state at ``j``, the target the token id there.

Probe files (:meth:`ProbeSet.save`) are ``.safetensors`` files of format
``lawwatch.probe/2``: the tokens and mask, the provenance (``meta``, JSON), the content hash of
the tokens and mask, and a file hash over all three, so an edited provenance is refused like
edited tokens.

A probe may also carry **groups** (a label per sequence: code vs prose, one language each,
the position of the relevant passage) and a **target mask** (the tokens whose prediction
counts: only the examples whose target token is marked are examples; the rest of the context
still runs through the model). Both are saved in the file and enter the content hash; a probe
without them keeps the hash it always had (``docs/breakdowns.md``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "lawwatch.probe/2"
"""The format :meth:`ProbeSet.save` writes and :meth:`ProbeSet.load` reads."""


def example_mask(
    attention_mask: torch.Tensor, offset: int = 1, target_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Which positions are examples: ``j`` and ``j + offset`` both real (and the target marked).

    Args:
        attention_mask: ``(batch, length)``, nonzero at real tokens.
        offset: Target position relative to the feature's (1 = next token, 0 = current,
            2 = next-next, -1 = previous).
        target_mask: ``(batch, length)``, nonzero at the tokens whose prediction counts (a
            probe's :attr:`ProbeSet.target_mask`); position ``j`` is an example only when
            ``target_mask[j + offset]`` is set. None: every real target counts.

    Returns:
        ``(batch, length)`` bool mask over feature positions.
    """
    real = attention_mask.bool()
    wanted = real if target_mask is None else real & target_mask.bool()
    if offset == 0:
        return wanted
    partner = torch.zeros_like(real)
    if offset > 0:
        partner[:, :-offset] = wanted[:, offset:]
    else:
        partner[:, -offset:] = wanted[:, :offset]
    return real & partner


def example_targets(input_ids: torch.Tensor, offset: int = 1) -> torch.Tensor:
    """The token id at ``j + offset`` for every position ``j`` (garbage where not an example)."""
    return torch.roll(input_ids, shifts=-offset, dims=1)


class ProbeSet:
    """Held-out token sequences, right-padded, with an attention mask and provenance.

    Build with :meth:`from_tokens` or :meth:`from_texts`; persist with :meth:`save` /
    :meth:`load`. Iterate with :meth:`batches`; split across processes with :meth:`shard`.

    Args:
        input_ids, attention_mask, meta: As the attributes.
        groups: A label per sequence (non-empty strings without ``/``), or None.
        group_names: Every group's name, in order (default: the labels in order of first
            appearance); names no sequence carries are kept (a shard may hold none of a group).
        target_mask: ``(sequences, length)``, nonzero at the tokens whose prediction counts,
            only at real tokens; None: every real token.

    Attributes:
        input_ids: ``(sequences, length)`` int64 token ids (pad positions hold 0).
        attention_mask: ``(sequences, length)`` bool, True at real tokens.
        meta: How the set was built (JSON-serializable); saved with it.
        group_names: The groups' names (empty: the probe has no groups).
        group_index: ``(sequences,)`` int64 index into ``group_names`` of each sequence's
            group, or None.
        target_mask: ``(sequences, length)`` bool, or None.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        meta: dict[str, Any] | None = None,
        *,
        groups: Sequence[str] | None = None,
        group_names: Sequence[str] | None = None,
        target_mask: torch.Tensor | None = None,
    ) -> None:
        if input_ids.ndim != 2:
            raise ValueError(
                f"input_ids must be (sequences, length), got shape {tuple(input_ids.shape)}."
            )
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                f"shape {tuple(input_ids.shape)}."
            )
        if input_ids.is_floating_point() or input_ids.is_complex():
            raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}.")
        mask = attention_mask.bool()
        _refuse_negative(input_ids, mask)
        if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            raise ValueError(
                "attention_mask must be right-padded (real tokens first in each row); "
                "left padding shifts position ids and changes the hidden states."
            )
        self.input_ids = torch.where(mask, input_ids.long(), 0).cpu()
        self.attention_mask = mask.cpu()
        self.meta: dict[str, Any] = dict(meta or {})
        self.group_names, self.group_index = _checked_groups(groups, group_names, len(mask))
        self.target_mask = _checked_target_mask(target_mask, self.attention_mask)

    @property
    def groups(self) -> list[str] | None:
        """Each sequence's group label, or None when the probe has no groups."""
        if self.group_index is None:
            return None
        return [self.group_names[i] for i in self.group_index.tolist()]

    def _like(self, **changes: Any) -> ProbeSet:
        """A probe with this one's fields, ``changes`` replacing some (rows kept aligned)."""
        fields = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "meta": self.meta,
            "groups": self.groups,
            "group_names": self.group_names or None,
            "target_mask": self.target_mask,
        }
        fields.update(changes)
        return ProbeSet(**fields)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def retrieval(cls, tokenizer: Any, **options: Any) -> ProbeSet:
        """The synthetic retrieval probe (``docs/retrieval.md``), grouped by position.

        k key–value passages, a question about one, its answer the marked target; each
        sequence's group is the queried passage's position. ``options``: those of
        :func:`lawwatch.probe.retrieval.retrieval_probe`.
        """
        from lawwatch.probe.retrieval import retrieval_probe

        return retrieval_probe(tokenizer, **options)

    @classmethod
    def from_tokens(
        cls,
        input_ids: torch.Tensor | Sequence[Sequence[int]],
        attention_mask: torch.Tensor | None = None,
        *,
        groups: Sequence[str] | None = None,
        target_mask: torch.Tensor | Sequence[Sequence[bool]] | None = None,
    ) -> ProbeSet:
        """From token ids: a ``(sequences, length)`` tensor (with optional mask) or ragged lists.

        Args:
            input_ids: Integer tensor, or a list of token-id lists of any lengths (right-padded
                here).
            attention_mask: For a tensor: nonzero at real tokens (default: all real).
            groups: A label per sequence (see :attr:`groups`), or None.
            target_mask: The tokens whose prediction counts: a tensor shaped like
                ``input_ids`` or, for ragged lists, a list of flag lists of the same lengths
                (see :func:`example_mask`); None: every token.
        """
        if not isinstance(input_ids, torch.Tensor):
            rows = [list(map(int, row)) for row in input_ids]
            if attention_mask is not None:
                raise ValueError("attention_mask is implied by ragged lists; pass only input_ids.")
            marks = None
            if target_mask is not None:
                marks = [list(map(bool, row)) for row in target_mask]
                lengths = [len(r) for r in rows]
                if [len(m) for m in marks] != lengths:
                    raise ValueError(
                        "target_mask must hold a flag per token of each ragged row (lengths "
                        f"{lengths[:8]}…), got lengths {[len(m) for m in marks][:8]}…."
                    )
            probe = cls._from_rows(rows, {"source": "tokens"}, groups=groups, marks=marks)
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
            probe = cls(
                input_ids,
                attention_mask,
                {"source": "tokens"},
                groups=groups,
                target_mask=target_mask,
            )
        probe._warn_short(stacklevel=3)
        return probe

    def _warn_short(self, stacklevel: int) -> None:
        short = int((self.attention_mask.sum(dim=1) < 2).sum())
        if short:
            warnings.warn(
                f"{short} of {len(self)} probe sequences hold fewer than 2 real tokens and give "
                "no example; they are kept (they cost nothing) and counted in "
                "summary()['sequences_without_examples'].",
                stacklevel=stacklevel,
            )

    @classmethod
    def _from_rows(
        cls,
        rows: list[list[int]],
        meta: dict[str, Any],
        *,
        groups: Sequence[str] | None = None,
        group_names: Sequence[str] | None = None,
        marks: list[list[bool]] | None = None,
    ) -> ProbeSet:
        if not rows:
            raise ValueError("The probe has no sequences.")
        length = max(len(r) for r in rows)
        if length == 0:
            raise ValueError("Every probe sequence is empty.")
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        target = None
        if marks is not None:
            target = torch.zeros(len(rows), length, dtype=torch.bool)
            for i, row in enumerate(marks):
                target[i, : len(row)] = torch.tensor(row, dtype=torch.bool)
        return cls(ids, mask, meta, groups=groups, group_names=group_names, target_mask=target)

    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str] | Mapping[str, Sequence[str]],
        tokenizer: Any,
        *,
        max_length: int,
        num_texts: int | None = None,
        seed: int = 0,
        add_special_tokens: bool = False,
        pack: bool = False,
        groups: Sequence[str] | None = None,
        target_spans: Sequence[Sequence[tuple[int, int]]] | None = None,
    ) -> ProbeSet:
        """Tokenize documents: each truncated to ``max_length`` (the paper's way) or packed.

        No pad token is needed: padding is lawwatch's own (right padding, masked).

        Args:
            texts: The documents (None counts as an empty text), or a dict of group name →
                documents (the same as the documents in order with ``groups`` their names).
            tokenizer: A Hugging Face tokenizer, or any callable with its interface.
            max_length: Tokens per sequence.
            num_texts: Draw this many documents at random (seeded) instead of all.
            seed: Seed of that draw.
            add_special_tokens: Let the tokenizer add BOS/EOS tokens.
            pack: Concatenate the documents, each followed by the tokenizer's EOS id when it
                has one, and cut the stream into ``max_length`` chunks (the last may be
                shorter); no token is lost to truncation. With groups, each group's documents
                are packed apart (no sequence mixes two groups).
            groups: A group label per document (see :attr:`groups`); kept for the sequences
                the documents give.
            target_spans: Per document, the ``(start, end)`` character spans whose tokens'
                prediction counts (the answer of a question, say): a token overlapping one is
                marked in :attr:`target_mask`. Needs a fast tokenizer (character offsets);
                not with ``pack``.

        Raises:
            ValueError: Too few texts, or none that yields at least two tokens.
        """
        if max_length < 2:
            raise ValueError(
                f"max_length must be at least 2 (a token and its next), got {max_length}."
            )
        if isinstance(texts, Mapping):
            if groups is not None:
                raise ValueError("texts is a dict of groups already; leave groups out.")
            groups = [name for name, docs in texts.items() for _ in _documents(name, docs)]
            texts = [doc for name, docs in texts.items() for doc in _documents(name, docs)]
        texts = list(texts)
        if groups is not None:
            groups = list(groups)
            if len(groups) != len(texts):
                raise ValueError(f"groups holds {len(groups)} labels for {len(texts)} texts.")
        if target_spans is not None:
            target_spans = list(target_spans)
            if pack:
                raise ValueError("target_spans mark tokens of each document: not with pack.")
            if len(target_spans) != len(texts):
                raise ValueError(
                    f"target_spans holds {len(target_spans)} span lists for {len(texts)} texts."
                )
        names = None if groups is None else list(dict.fromkeys(groups))
        if num_texts is not None:
            if num_texts > len(texts):
                raise ValueError(f"num_texts={num_texts} but only {len(texts)} texts were given.")
            chosen = random.Random(seed).sample(range(len(texts)), num_texts)
            texts = [texts[i] for i in chosen]
            groups = None if groups is None else [groups[i] for i in chosen]
            target_spans = None if target_spans is None else [target_spans[i] for i in chosen]
        for i, text in enumerate(texts):
            if text is not None and not isinstance(text, str):
                raise TypeError(f"Probe text {i} is a {type(text).__name__}, not a str.")
        texts = [text or "" for text in texts]
        # packed, whole documents are tokenized and cut here into max_length chunks: the
        # tokenizer's warning that one is longer than the model takes is not true of the probe
        quiet = {"verbose": False} if pack else {}
        if target_spans is not None:
            quiet["return_offsets_mapping"] = True
        tokenized = tokenizer(
            texts,
            add_special_tokens=add_special_tokens,
            truncation=not pack,
            max_length=None if pack else max_length,
            **quiet,
        )
        encoded = tokenized["input_ids"]
        marks = None
        if target_spans is not None:
            marks = [
                _marked_tokens(offsets, spans, i)
                for i, (offsets, spans) in enumerate(
                    zip(tokenized["offset_mapping"], target_spans, strict=True)
                )
            ]
        meta = {
            "source": "texts",
            "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
            "max_length": max_length,
            "seed": seed,
        }
        labels: list[str] | None = None
        if pack:
            separator = getattr(tokenizer, "eos_token_id", None)
            if groups is None:
                rows = _pack(encoded, max_length, separator)
            else:  # each group's documents packed apart
                rows, labels = [], []
                for name in names:
                    mine = [r for r, g in zip(encoded, groups, strict=True) if g == name]
                    packed = _pack(mine, max_length, separator)
                    rows += packed
                    labels += [name] * len(packed)
            meta.update(pack=True, separator=separator, num_texts=len(texts))
            short = sum(len(r) == 0 for r in encoded)
            what = "are empty and add no token"
        else:
            kept = [i for i, r in enumerate(encoded) if len(r) >= 2]
            rows = [list(encoded[i]) for i in kept]
            labels = None if groups is None else [groups[i] for i in kept]
            marks = None if marks is None else [marks[i] for i in kept]
            meta.update(num_texts=len(rows))
            short = len(encoded) - len(rows)
            what = "give fewer than 2 tokens (no next-token pair) and are left out of the probe"
        if short:
            warnings.warn(f"{short} of {len(encoded)} probe texts {what}.", stacklevel=2)
        if not rows:
            raise ValueError("No probe text yields 2 or more tokens; pass longer, non-empty texts.")
        return cls._from_rows(rows, meta, groups=labels, group_names=names, marks=marks)

    @classmethod
    def from_dataset(
        cls,
        dataset: Any,
        tokenizer: Any,
        *,
        text_column: str = "text",
        max_length: int,
        num_texts: int | None = None,
        seed: int = 0,
        add_special_tokens: bool = False,
        pack: bool = False,
        group_column: str | None = None,
    ) -> ProbeSet:
        """Documents from a column of a ``datasets.Dataset`` (optional dependency ``datasets``).

        The same as :meth:`from_texts` on ``list(dataset[text_column])`` with the same
        ``num_texts`` and ``seed``, without materializing the column when sampling.

        Args:
            dataset: A map-style ``datasets.Dataset``, or the path of one saved with
                ``save_to_disk``.
            text_column: The column holding the documents.
            group_column: A column holding each document's group label (its values are made
                str), or None.
            tokenizer, max_length, num_texts, seed, add_special_tokens, pack: As in
                :meth:`from_texts`.
        """
        from lawwatch.probe.readers import dataset_texts

        texts, rows, groups = dataset_texts(dataset, text_column, num_texts, seed, group_column)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            probe = cls.from_texts(
                texts,
                tokenizer,
                max_length=max_length,
                add_special_tokens=add_special_tokens,
                pack=pack,
                groups=groups,
            )
        for warning in caught:  # re-issued here, so they point at the caller
            warnings.warn(str(warning.message), warning.category, stacklevel=2)
        probe.meta.update(source="dataset", text_column=text_column, dataset_rows=rows, seed=seed)
        if group_column is not None:
            probe.meta["group_column"] = group_column
        return probe

    @classmethod
    def from_token_file(
        cls,
        path: str | Path,
        *,
        seq_len: int,
        num_sequences: int | None = None,
        seed: int = 0,
        dtype: str | None = None,
        key: str | None = None,
    ) -> ProbeSet:
        """Token ids from a file: a 1-D token stream cut into chunks, or 2-D sequences.

        Args:
            path: ``.npy``, ``.safetensors`` (a lawwatch probe file is read with :meth:`load`),
                or a raw binary file of ``dtype`` ids (nanoGPT's ``train.bin`` / ``val.bin``).
            seq_len: Tokens per sequence: the chunk length of a stream (its tail shorter than
                ``seq_len`` is not used; ``meta["tail_tokens_unused"]`` says how many), the
                truncation of 2-D rows.
            num_sequences: Draw this many chunks (or rows) at random (seeded) instead of all.
            seed: Seed of that draw.
            dtype: Element type of a raw binary file, e.g. ``"uint16"``.
            key: The tensor of a ``.safetensors`` file (default ``input_ids`` or the only one;
                an ``attention_mask`` tensor beside ``input_ids`` is used as the mask).
        """
        from lawwatch.probe.readers import read_token_file, stream_chunks

        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 (a token and its next), got {seq_len}.")
        if str(path).endswith(".safetensors") and _is_probe_file(path):
            return cls.load(path)
        ids, mask, meta = read_token_file(path, dtype=dtype, key=key)
        meta.update(source="token_file", seq_len=seq_len, seed=seed)
        if ids.ndim == 1:
            rows, tail = stream_chunks(ids, seq_len, num_sequences, seed)
            meta["tail_tokens_unused"] = tail
            return cls(torch.from_numpy(rows), torch.ones(rows.shape, dtype=torch.bool), meta)
        index = list(range(ids.shape[0]))
        if num_sequences is not None:
            if num_sequences > len(index):
                raise ValueError(
                    f"num_sequences={num_sequences} but {Path(path).name} holds {len(index)} rows."
                )
            index = sorted(random.Random(seed).sample(index, num_sequences))
        rows = torch.from_numpy(np.asarray(ids[index, :seq_len]).astype(np.int64))
        real = (
            torch.ones(rows.shape, dtype=torch.bool)
            if mask is None
            else torch.from_numpy(np.asarray(mask[index, :seq_len]))
        )
        probe = cls(rows, real, meta)
        probe._warn_short(stacklevel=3)
        return probe

    # -- persistence --------------------------------------------------------------------------

    def content_hash(self) -> str:
        """SHA-256 of the tokens and mask: equal hashes mean the same probe.

        Provenance (``meta``) is not part of it: the same tokens built two ways are the same
        probe. Saved files also carry a hash over the provenance (see :meth:`save`). The
        groups (names and each sequence's) and the target mask are part of it when present.
        """
        h = hashlib.sha256()
        h.update(str(tuple(self.input_ids.shape)).encode())
        h.update(self.input_ids.numpy().tobytes())
        h.update(self.attention_mask.numpy().tobytes())
        # groups and the target mask only when present: a probe without keeps its old hash
        if self.group_index is not None:
            h.update(b"\0groups\0" + json.dumps(list(self.group_names)).encode())
            h.update(self.group_index.numpy().tobytes())
        if self.target_mask is not None:
            h.update(b"\0target_mask\0" + self.target_mask.numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write a ``.safetensors`` file: tokens, mask, provenance, content and file hashes.

        The file hash covers the format, the content hash and the provenance JSON exactly as
        stored, so :meth:`load` refuses a file whose tokens, mask or ``meta`` were changed.
        """
        path = Path(path)
        data = self.to_bytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def to_bytes(self) -> bytes:
        """The bytes :meth:`save` writes (for a caller that writes files its own way)."""
        from safetensors.torch import save

        try:
            meta = json.dumps(self.meta)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"probe.meta must be JSON-serializable to be saved ({error}); keep strings, "
                "numbers, lists and dicts in it."
            ) from error
        content = self.content_hash()
        metadata = {
            "format": FORMAT,
            "meta": meta,
            "content_hash": content,
            "hash": _file_hash(FORMAT, content, meta),
        }
        tensors = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.group_index is not None:
            tensors["groups"] = self.group_index
            metadata["group_names"] = json.dumps(list(self.group_names))
        if self.target_mask is not None:
            tensors["target_mask"] = self.target_mask
        return save(tensors, metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> ProbeSet:
        """Read a probe written by :meth:`save`, checking its format and hashes.

        Raises:
            FileNotFoundError: No file at ``path``.
            ValueError: The file is damaged (truncated, invalid metadata, missing tensors, a
                hash that does not match) or not a lawwatch probe; the message names the file
                and what is wrong.
        """
        path = Path(path)
        tensors, metadata, names = _read_safetensors(
            path, ("input_ids", "attention_mask", "groups", "target_mask")
        )
        version = metadata.get("format")
        if version != FORMAT:
            raise ValueError(
                f"{path} is not a lawwatch probe (format {version!r}, expected {FORMAT!r}); "
                "build one with ProbeSet.save()."
            )
        missing = [k for k in ("meta", "hash") if k not in metadata]
        missing += [k for k in ("input_ids", "attention_mask") if k not in tensors]
        if missing:
            raise ValueError(
                f"{path} is a damaged lawwatch probe: it lacks {', '.join(missing)} (it holds "
                f"tensors {names} and metadata {sorted(metadata)}); write it again "
                "with ProbeSet.save()."
            )
        try:
            meta = json.loads(metadata["meta"])
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} is a damaged lawwatch probe: its 'meta' metadata is not valid JSON "
                f"({error}); write it again with ProbeSet.save()."
            ) from error
        if not isinstance(meta, dict):
            raise ValueError(
                f"{path} is a damaged lawwatch probe: its 'meta' metadata is a "
                f"{type(meta).__name__}, not a JSON object; write it again with ProbeSet.save()."
            )
        try:
            group_names = json.loads(metadata.get("group_names", "null"))
            index = tensors.get("groups")
            if (index is None) != (group_names is None):
                raise ValueError("it holds groups without their names, or names without groups")
            probe = cls(
                tensors["input_ids"],
                tensors["attention_mask"],
                meta,
                groups=None if index is None else [group_names[i] for i in index.tolist()],
                group_names=group_names,
                target_mask=tensors.get("target_mask"),
            )
        except (TypeError, ValueError, IndexError) as error:
            raise ValueError(f"{path} is a damaged lawwatch probe: {error}") from error
        content = probe.content_hash()
        if metadata.get("content_hash", content) != content:
            raise ValueError(
                f"{path} is corrupt: the content hash of its tokens and mask does not match the "
                "one stored in it."
            )
        if _file_hash(version, content, metadata["meta"]) != metadata["hash"]:
            raise ValueError(
                f"{path} is corrupt: its hash does not match its tokens, mask and provenance "
                "(meta) — one of them was changed after ProbeSet.save()."
            )
        return probe

    # -- use ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def example_positions(self, offset: int = 1) -> torch.Tensor:
        """``(sequences, length)`` bool: the examples' feature positions (with the target mask).

        :func:`example_mask` of the attention mask and :attr:`target_mask`.
        """
        return example_mask(self.attention_mask, offset, self.target_mask)

    def num_examples(self, offset: int = 1) -> int:
        """Number of usable (feature position, target) pairs."""
        return int(self.example_positions(offset).sum())

    def target_ids(self, offset: int = 1) -> torch.Tensor:
        """The distinct target token ids over all examples, sorted."""
        targets = example_targets(self.input_ids, offset)
        return torch.unique(targets[self.example_positions(offset)])

    def group_examples(self, offset: int = 1) -> dict[str, int]:
        """Examples per group (every group named, 0 for one no sequence here carries)."""
        if self.group_index is None:
            return {}
        per = self.example_positions(offset).sum(dim=1)
        counts = torch.zeros(len(self.group_names), dtype=torch.int64)
        counts.index_add_(0, self.group_index, per)
        return dict(zip(self.group_names, counts.tolist(), strict=True))

    def select(self, rows: Sequence[int] | torch.Tensor) -> ProbeSet:
        """The probe of some sequences (in the order given), groups and target mask kept."""
        index = torch.as_tensor(rows, dtype=torch.int64)
        groups = self.groups
        return self._like(
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            meta=dict(self.meta),
            groups=None if groups is None else [groups[i] for i in index.tolist()],
            target_mask=None if self.target_mask is None else self.target_mask[index],
        )

    def group(self, name: str) -> ProbeSet:
        """The probe of one group's sequences alone (its groups kept: every name).

        Raises:
            ValueError: No such group.
        """
        if name not in self.group_names:
            raise ValueError(f"No group {name!r}; the probe's groups are {list(self.group_names)}.")
        index = self.group_names.index(name)
        return self.select((self.group_index == index).nonzero().squeeze(1))

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(input_ids, attention_mask)`` batches of at most ``batch_size`` rows.

        Each batch is trimmed to its longest real row, so short rows cost no compute.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        for start in range(0, len(self), batch_size):
            mask = self.attention_mask[start : start + batch_size]
            width = max(int(mask.sum(dim=1).max()), 1)
            yield self.input_ids[start : start + batch_size, :width], mask[:, :width]

    def shard(self, rank: int, world_size: int) -> ProbeSet:
        """This process's share: a contiguous block of ``ceil(len / world_size)`` rows.

        Short shards are padded with fully masked rows (no examples), so every process runs
        the same number of forward passes for any batch size — under FSDP and ZeRO-3 each
        forward is a collective.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}.")
        per = math.ceil(len(self) / world_size)
        rows = slice(rank * per, (rank + 1) * per)
        ids = self.input_ids[rows]
        mask = self.attention_mask[rows]
        target = None if self.target_mask is None else self.target_mask[rows]
        groups = None if self.group_index is None else self.groups[rows]
        missing = per - ids.shape[0]
        if missing:
            ids = torch.cat([ids, ids.new_zeros(missing, ids.shape[1])])
            mask = torch.cat([mask, mask.new_zeros(missing, mask.shape[1])])
            if target is not None:
                target = torch.cat([target, target.new_zeros(missing, target.shape[1])])
            if groups is not None:  # padding rows give no example: any group will do
                groups = groups + [self.group_names[0]] * missing
        return self._like(
            input_ids=ids,
            attention_mask=mask,
            meta={**self.meta, "shard": [rank, world_size]},
            groups=groups,
            target_mask=target,
        )

    def summary(self, offset: int = 1) -> dict[str, int]:
        """What the probe holds, at target offset ``offset``.

        Returns:
            ``sequences``, their padded ``length``, real ``tokens``, usable ``examples``,
            ``distinct_targets`` and ``sequences_without_examples`` (too short for one, or no
            marked target); with groups also ``groups`` (how many), with a target mask
            ``marked_targets`` (tokens marked).
        """
        has_example = self.example_positions(offset).any(dim=1)
        out = {
            "sequences": len(self),
            "length": int(self.input_ids.shape[1]),
            "tokens": int(self.attention_mask.sum()),
            "examples": self.num_examples(offset),
            "distinct_targets": int(self.target_ids(offset).numel()),
            "sequences_without_examples": int((~has_example).sum()),
        }
        if self.group_index is not None:
            out["groups"] = len(self.group_names)
        if self.target_mask is not None:
            out["marked_targets"] = int(self.target_mask.sum())
        return out

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.summary().items())
        return f"ProbeSet({fields})"


def _pack(encoded: Sequence[Sequence[int]], length: int, separator: int | None) -> list[list[int]]:
    """Concatenate documents (each followed by ``separator``) and cut into ``length`` chunks."""
    stream: list[int] = []
    for row in encoded:
        if len(row):
            stream.extend(row)
            if separator is not None:
                stream.append(int(separator))
    rows = [stream[i : i + length] for i in range(0, len(stream), length)]
    return [r for r in rows if len(r) >= 2]


def _file_hash(version: str, content: str, meta: str) -> str:
    """SHA-256 over a probe file's format, content hash and provenance JSON (as stored)."""
    h = hashlib.sha256()
    for part in (version, content, meta):
        h.update(part.encode())
        h.update(b"\0")  # a separator no part holds: no two splits hash alike
    return h.hexdigest()


def _refuse_negative(input_ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Token ids at real positions are indices into an embedding: none may be negative."""
    negative = (input_ids < 0) & mask
    if bool(negative.any()):
        row, col = (int(i) for i in negative.nonzero()[0])
        value = int(input_ids[row, col])
        raise ValueError(
            f"input_ids hold {int(negative.sum())} negative token ids at real positions (the "
            f"first, {value}, at sequence {row}, position {col}); token ids index the model's "
            "embedding and cannot be negative. -100 is the label padding of Hugging Face "
            "losses, not a token: pass the token ids (not the labels), and mark padding with "
            "attention_mask=0 after the real tokens, or pass ragged lists."
        )


def _read_safetensors(
    path: Path, tensors: tuple[str, ...] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """The named ``tensors`` (those present), the metadata and every tensor name of a file.

    Raises:
        FileNotFoundError: No file at ``path``.
        ValueError: Not a readable safetensors file (truncated, damaged, another format).
    """
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"No probe file at {path}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            names = sorted(f.keys())
            found = {k: f.get_tensor(k) for k in tensors if k in names}
    except Exception as error:  # safetensors raises its own SafetensorError (Rust)
        raise ValueError(
            f"{path} is not a readable safetensors file ({type(error).__name__}: {error}): it "
            "is truncated or damaged, or another kind of file; write it again with "
            "ProbeSet.save()."
        ) from error
    return found, metadata, names


def _is_probe_file(path: str | Path) -> bool:
    _, metadata, _ = _read_safetensors(Path(path))
    return metadata.get("format") == FORMAT


def _checked_groups(
    groups: Sequence[str] | None, names: Sequence[str] | None, sequences: int
) -> tuple[tuple[str, ...], torch.Tensor | None]:
    """``(group names, (sequences,) index)`` of per-sequence labels; ``((), None)`` without."""
    if groups is None:
        if names:
            raise ValueError("group_names given without groups (a label per sequence).")
        return (), None
    if isinstance(groups, str):
        raise TypeError("groups must be a label per sequence (a list of str), not one str.")
    labels = list(groups)
    if len(labels) != sequences:
        raise ValueError(
            f"groups holds {len(labels)} labels for {sequences} sequences; give one label per "
            "sequence."
        )
    order = list(dict.fromkeys(labels)) if names is None else list(names)
    for name in order:
        _check_group_name(name)
    if len(set(order)) != len(order):
        raise ValueError(f"group_names repeat a name: {order}.")
    where = {name: i for i, name in enumerate(order)}
    unknown = sorted({label for label in labels if label not in where})
    if unknown:
        raise ValueError(f"groups label(s) {unknown} are not among group_names {order}.")
    if not order:
        raise ValueError("groups were given for a probe of no sequence.")
    index = torch.tensor([where[label] for label in labels], dtype=torch.int64)
    return tuple(order), index


def _check_group_name(name: Any) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"A group name must be a non-empty str, got {name!r}.")
    if "/" in name:
        raise ValueError(
            f"Group name {name!r} holds '/', which the trackers read as a folder of their keys "
            "(lawwatch/group/<name>/…); use another character."
        )


def _checked_target_mask(target_mask: Any, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The target mask as ``(sequences, length)`` bool, set only at real tokens."""
    if target_mask is None:
        return None
    if not isinstance(target_mask, torch.Tensor):
        raise TypeError(f"target_mask must be a tensor, got {type(target_mask).__name__}.")
    if target_mask.shape != attention_mask.shape:
        raise ValueError(
            f"target_mask shape {tuple(target_mask.shape)} differs from the tokens' "
            f"{tuple(attention_mask.shape)}."
        )
    marked = target_mask.bool().cpu()
    outside = marked & ~attention_mask
    if bool(outside.any()):
        row, col = (int(i) for i in outside.nonzero()[0])
        raise ValueError(
            f"target_mask marks {int(outside.sum())} padding position(s) (the first at sequence "
            f"{row}, position {col}); mark only real tokens."
        )
    return marked


def _marked_tokens(
    offsets: Sequence[Sequence[int]], spans: Sequence[Sequence[int]], text: int
) -> list[bool]:
    """Which tokens (their character ``offsets``) overlap one of the character ``spans``."""
    checked = []
    for span in spans:
        if len(span) != 2 or not 0 <= span[0] < span[1]:
            raise ValueError(
                f"target_spans of text {text}: {tuple(span)!r} is not a (start, end) character "
                "span with 0 <= start < end."
            )
        checked.append((int(span[0]), int(span[1])))
    return [
        any(start < hi and lo < end and start < end for lo, hi in checked) for start, end in offsets
    ]


def _documents(name: str, docs: Any) -> list[str]:
    """A group's documents of a dict of group name → documents (a str alone refused)."""
    if isinstance(docs, str):
        raise TypeError(
            f"texts[{name!r}] is one str; give each group a list of documents ([text])."
        )
    return list(docs)
