"""Where probe tokens come from: texts in a ``datasets.Dataset``, token ids in a file.

Readers only; :class:`lawwatch.probe.ProbeSet` turns what they return into a probe. Every
random choice takes a seed, so the same arguments give the same probe.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as error:  # optional dependency
        raise ImportError(
            "Reading a saved dataset needs the `datasets` package: "
            "pip install 'lawwatch[datasets]'."
        ) from error
    return datasets


def dataset_texts(
    dataset: Any,
    text_column: str,
    num_texts: int | None,
    seed: int,
    group_column: str | None = None,
) -> tuple[list[Any], int, list[str] | None]:
    """The documents of ``dataset[text_column]``: all, or ``num_texts`` drawn with ``seed``.

    The draw is ``random.Random(seed).sample`` over row indices, so it picks the same rows as
    :meth:`ProbeSet.from_texts` would from the column as a list.

    Args:
        dataset: A ``datasets.Dataset``, or a path written by ``Dataset.save_to_disk``.
        text_column: The column holding the texts.
        num_texts: How many documents to draw (default all).
        seed: Seed of the draw.
        group_column: A column of each document's group label (made str), or None.

    Returns:
        The texts (in draw order), the dataset's row count, and the drawn documents' group
        labels (None without ``group_column``).
    """
    if isinstance(dataset, (str, os.PathLike)):
        dataset = _import_datasets().load_from_disk(str(dataset))
    if isinstance(dataset, dict):  # a DatasetDict is a dict of splits
        raise TypeError(
            f"Got a dataset with splits {list(dataset)}; pass one split, "
            "e.g. dataset['validation']."
        )
    if not all(hasattr(dataset, a) for a in ("column_names", "select", "__len__")):
        raise TypeError(
            f"Expected a datasets.Dataset (map-style), got {type(dataset).__name__}; for a "
            "streaming IterableDataset take the documents first: "
            "ProbeSet.from_texts([row['text'] for row in ds.take(200)], …)."
        )
    if text_column not in dataset.column_names:
        raise ValueError(
            f"The dataset has no column {text_column!r}; its columns are {dataset.column_names}. "
            "Pass text_column=…."
        )
    if group_column is not None and group_column not in dataset.column_names:
        raise ValueError(
            f"The dataset has no column {group_column!r}; its columns are "
            f"{dataset.column_names}. Pass group_column=…."
        )
    rows = len(dataset)
    if num_texts is not None:
        if num_texts > rows:
            raise ValueError(f"num_texts={num_texts} but the dataset has only {rows} rows.")
        dataset = dataset.select(random.Random(seed).sample(range(rows), num_texts))
    groups = None
    if group_column is not None:
        groups = [_label(v, group_column, i) for i, v in enumerate(dataset[group_column])]
    return list(dataset[text_column]), rows, groups


def _label(value: Any, column: str, row: int) -> str:
    """A group label of a dataset column: the value as a str (None refused)."""
    if value is None:
        raise ValueError(
            f"Row {row} of the drawn documents has no group (column {column!r} holds None); "
            "give every document a group."
        )
    return str(value)


def read_token_file(
    path: str | os.PathLike, *, dtype: str | np.dtype | None = None, key: str | None = None
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Token ids from ``.npy``, ``.safetensors`` or a raw binary file (nanoGPT's ``.bin``).

    Args:
        path: The file. ``.npy`` and ``.safetensors`` carry their dtype; any other file is raw
            ids of ``dtype`` (nanoGPT writes ``uint16``), memory-mapped.
        dtype: The element type of a raw file (required there, refused elsewhere).
        key: For ``.safetensors``: the tensor to read (default: ``input_ids``, or the only one).

    Returns:
        ``(ids, attention_mask or None, meta)``: ids 1-D (a token stream) or 2-D (sequences).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    mask = None
    if suffix in (".npy", ".safetensors") and dtype is not None:
        raise ValueError(f"{path.name} records its own dtype; pass dtype only for raw files.")
    if not path.is_file():
        raise FileNotFoundError(f"No token file at {path}.")
    if suffix == ".npy":
        try:
            ids = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as error:  # a truncated or foreign file
            raise ValueError(f"{path} is not a readable .npy file: {error}") from error
    elif suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(path))
        except Exception as error:  # safetensors raises its own SafetensorError (Rust)
            raise ValueError(
                f"{path} is not a readable safetensors file ({type(error).__name__}: {error}): "
                "it is truncated or damaged, or another kind of file."
            ) from error
        if key is None:
            key = (
                "input_ids" if "input_ids" in tensors or len(tensors) != 1 else next(iter(tensors))
            )
        if key not in tensors:
            raise ValueError(
                f"{path.name} has no tensor {key!r}; it holds {sorted(tensors)}. Pass key=…."
            )
        ids = tensors[key]
        if key == "input_ids" and "attention_mask" in tensors:
            mask = tensors["attention_mask"].astype(bool)
    else:
        if dtype is None:
            raise ValueError(
                f"{path.name} is a raw binary file: pass its element type, e.g. dtype='uint16' "
                "for nanoGPT's train.bin / val.bin."
            )
        ids = _raw_tokens(path, dtype)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{path.name} holds {ids.dtype} values; token ids must be integers.")
    if ids.ndim not in (1, 2) or ids.size == 0:
        raise ValueError(
            f"{path.name} holds an array of shape {ids.shape}; expected a non-empty 1-D token "
            "stream or 2-D (sequences, length) array."
        )
    if ids.dtype.kind == "i" and int(ids.min()) < 0:
        raise ValueError(f"{path.name} holds negative token ids (min {int(ids.min())}).")
    meta = {"path": str(path), "dtype": str(ids.dtype), "key": key}
    return ids, mask, meta


def stream_chunks(
    stream: np.ndarray, seq_len: int, num_sequences: int | None, seed: int
) -> tuple[np.ndarray, int]:
    """Non-overlapping ``seq_len`` chunks of a 1-D token stream: all, or a seeded draw.

    Returns:
        ``(chunks (num, seq_len) int64, tokens of the tail shorter than seq_len, unused)``.
    """
    total = stream.shape[0] // seq_len
    if total == 0:
        raise ValueError(
            f"The token stream holds {stream.shape[0]} tokens, fewer than seq_len={seq_len}."
        )
    if num_sequences is None:
        starts = range(total)
    else:
        if num_sequences > total:
            raise ValueError(
                f"num_sequences={num_sequences} but the stream holds only {total} chunks of "
                f"{seq_len} tokens."
            )
        starts = sorted(random.Random(seed).sample(range(total), num_sequences))
    chunks = np.stack([np.asarray(stream[s * seq_len : (s + 1) * seq_len]) for s in starts])
    return chunks.astype(np.int64), stream.shape[0] - total * seq_len


def _raw_tokens(path: Path, dtype: str) -> np.ndarray:
    """A raw binary token file as a 1-D array, refused with its name when it cannot be one."""
    try:
        kind = np.dtype(dtype)
    except TypeError as error:
        raise ValueError(
            f"{dtype!r} is not a numpy element type (--token-dtype), for {path}: e.g. uint16."
        ) from error
    size = path.stat().st_size
    if size == 0 or size % kind.itemsize:
        raise ValueError(
            f"{path} holds {size} bytes: not a whole, non-zero number of {kind} token ids "
            f"({kind.itemsize} bytes each). Check the file (truncated?) and --token-dtype."
        )
    return np.memmap(path, dtype=kind, mode="r")
