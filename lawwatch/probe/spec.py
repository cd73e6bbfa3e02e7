"""ProbeSpec: how to build a probe from files, as the command line describes it.

One of three sources: text files (or globs of them), a ``datasets.Dataset`` saved with
``save_to_disk``, or a file of token ids; texts are tokenized with a tokenizer (a directory or
hub id). :meth:`ProbeSpec.build` calls :meth:`~lawwatch.probe.ProbeSet.from_texts`,
:meth:`~lawwatch.probe.ProbeSet.from_dataset` or :meth:`~lawwatch.probe.ProbeSet.from_token_file`
and records the spec in the probe's provenance. Each field's docstring is its ``--help``.
"""

from __future__ import annotations

import glob
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from lawwatch.probe.set import ProbeSet
from lawwatch.probe.tokenizer import load_tokenizer

__all__ = ["ProbeSpec", "read_texts", "read_texts_by_file"]

TextUnit = Literal["file", "line", "paragraph"]


@dataclass(frozen=True)
class ProbeSpec:
    """Where a probe's sequences come from, and how many of which length."""

    texts: tuple[str, ...] = ()
    """Text files, or quoted globs of them ('docs/**/*.txt'); see text_unit for what makes
    one document."""
    text_unit: TextUnit = "file"
    """What one document of a text file is: the whole 'file', each non-empty 'line' (a file of
    sentences), or each 'paragraph' (blocks between blank lines)."""
    dataset: str | None = None
    """A datasets.Dataset saved with save_to_disk (its directory)."""
    dataset_split: str | None = None
    """The split to use when the saved dataset has several (a DatasetDict)."""
    encoding: str = "utf-8"
    """The text files' encoding; a file that does not decode with it is refused (never
    decoded with replacement characters)."""
    text_column: str = "text"
    """The dataset column holding the documents."""
    token_file: str | None = None
    """Token ids: .npy, .safetensors, or a raw binary file (nanoGPT's val.bin, see
    token_dtype); a 1-D stream is cut into max_length chunks."""
    token_dtype: str | None = None
    """Element type of a raw binary token file, e.g. uint16."""
    tokenizer: str | None = None
    """The tokenizer for texts: a directory or hub id, or a .gguf file (analyze: default the
    first checkpoint's own)."""
    gguf_file: str | None = None
    """The GGUF file inside the tokenizer's directory or hub repository whose tokenizer to use
    (transformers' GGUF loader: needs the gguf package)."""
    max_length: int = 512
    """Tokens per probe sequence (the paper truncates documents to 512)."""
    num_texts: int | None = None
    """Draw this many documents (or token chunks) at random instead of all."""
    seed: int = 0
    """Seed of that draw."""
    pack: bool = False
    """Concatenate the documents (EOS between them) and cut the stream into max_length
    chunks, instead of truncating each document."""
    add_special_tokens: bool = False
    """Let the tokenizer add its BOS/EOS tokens to each document."""
    group_column: str | None = None
    """The dataset column holding each document's group label (by_group measures the law per
    group)."""
    group_by_file: bool = False
    """Each text file is a group, named by its file name (by_group measures the law per
    group)."""

    def __post_init__(self) -> None:
        if isinstance(self.texts, str | list):
            object.__setattr__(
                self, "texts", (self.texts,) if isinstance(self.texts, str) else tuple(self.texts)
            )
        given = [n for n in ("texts", "dataset", "token_file") if getattr(self, n)]
        if len(given) > 1:
            raise ValueError(
                f"Give one probe source, not {' and '.join(given)}: texts (--texts), a saved "
                "dataset (--dataset) or a token file (--token-file)."
            )
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}.")
        if self.num_texts is not None and self.num_texts < 1:
            raise ValueError(f"num_texts must be positive, got {self.num_texts}.")
        if self.group_column is not None and self.source != "dataset":
            raise ValueError("group_column names a dataset column: give --dataset too.")
        if self.group_by_file and self.source != "texts":
            raise ValueError("group_by_file makes each text file a group: give --texts too.")
        if self.gguf_file is not None and self.tokenizer is None:
            raise ValueError(
                "gguf_file names a file inside the tokenizer's directory or repository: give "
                "--tokenizer too (or --tokenizer PATH.gguf alone)."
            )

    @property
    def source(self) -> str | None:
        """'texts', 'dataset', 'token_file', or None when no source is given."""
        return next((n for n in ("texts", "dataset", "token_file") if getattr(self, n)), None)

    @property
    def needs_tokenizer(self) -> bool:
        """Whether building needs a tokenizer (texts and datasets do)."""
        return self.source in ("texts", "dataset")

    def build(self, tokenizer: Any = None) -> ProbeSet:
        """Build the probe.

        Args:
            tokenizer: A tokenizer object for texts, used when :attr:`tokenizer` names none.

        Raises:
            ValueError: No source, no tokenizer for texts, or what the ProbeSet constructors
                refuse (too few texts, …).
        """
        if self.source is None:
            raise ValueError(
                "No probe source: give --texts FILE..., --dataset DIR or --token-file FILE "
                "(or an existing probe file with --probe)."
            )
        if self.source == "token_file":
            probe = ProbeSet.from_token_file(
                self.token_file,
                seq_len=self.max_length,
                num_sequences=self.num_texts,
                seed=self.seed,
                dtype=self.token_dtype,
            )
        else:
            # the texts first: a path that matches nothing fails before a tokenizer loads
            texts = self.source == "texts"
            documents, groups = None, None
            if texts and self.group_by_file:
                documents, groups = read_texts_by_file(self.texts, self.text_unit, self.encoding)
            elif texts:
                documents = read_texts(self.texts, self.text_unit, self.encoding)
            if self.tokenizer is not None:
                tokenizer = load_tokenizer(self.tokenizer, gguf_file=self.gguf_file)
            if tokenizer is None:
                raise ValueError("Building a probe from texts needs a tokenizer: --tokenizer.")
            common = {
                "max_length": self.max_length,
                "num_texts": self.num_texts,
                "seed": self.seed,
                "add_special_tokens": self.add_special_tokens,
                "pack": self.pack,
            }
            if self.source == "texts":
                probe = ProbeSet.from_texts(documents, tokenizer, groups=groups, **common)
            else:
                probe = ProbeSet.from_dataset(
                    self._dataset(),
                    tokenizer,
                    text_column=self.text_column,
                    group_column=self.group_column,
                    **common,
                )
        probe.meta["spec"] = {k: v for k, v in asdict(self).items() if v not in (None, ())}
        return probe

    def _dataset(self) -> Any:
        from lawwatch.probe.readers import _import_datasets

        dataset = _import_datasets().load_from_disk(str(self.dataset))
        if isinstance(dataset, dict):  # a DatasetDict: a dict of splits
            if self.dataset_split is None:
                raise ValueError(
                    f"{self.dataset} holds the splits {sorted(dataset)}; choose one with "
                    "--dataset-split."
                )
            if self.dataset_split not in dataset:
                raise ValueError(
                    f"{self.dataset} has no split {self.dataset_split!r}; its splits are "
                    f"{sorted(dataset)}."
                )
            return dataset[self.dataset_split]
        if self.dataset_split is not None:
            raise ValueError(f"{self.dataset} is a single dataset; leave --dataset-split out.")
        return dataset


def read_texts(
    patterns: tuple[str, ...] | list[str], unit: TextUnit = "file", encoding: str = "utf-8"
) -> list[str]:
    """The documents of text files named by paths or globs (sorted within each glob).

    Raises:
        FileNotFoundError: A path or glob that matches no file.
        ValueError: A file that does not decode with ``encoding`` (named, with the offset).
    """
    return [doc for _, doc in _read(patterns, unit, encoding)]


def read_texts_by_file(
    patterns: tuple[str, ...] | list[str], unit: TextUnit = "file", encoding: str = "utf-8"
) -> tuple[list[str], list[str]]:
    """:func:`read_texts`, and each document's group: the name of the file it comes from.

    Raises:
        ValueError: Two files of the same name (their groups would merge), and what
            :func:`read_texts` refuses.
    """
    found = _read(patterns, unit, encoding)
    names: dict[str, Path] = {}
    for path, _ in found:
        if names.setdefault(path.name, path) != path:
            raise ValueError(
                f"{names[path.name]} and {path} share the file name {path.name!r}, and each "
                "file's group is named by its file name: rename one."
            )
    return [doc for _, doc in found], [path.name for path, _ in found]


def _read(
    patterns: tuple[str, ...] | list[str], unit: TextUnit, encoding: str
) -> list[tuple[Path, str]]:
    """Each document of the files, with its file."""
    documents: list[tuple[Path, str]] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
            paths = [p for p in paths if p.is_file()]
        else:
            paths = [Path(pattern)] if Path(pattern).is_file() else []
        if not paths:
            raise FileNotFoundError(f"No text file matches {pattern!r}.")
        for path in paths:
            text = _decoded(path, encoding)
            if unit == "file":
                documents.append((path, text))
            elif unit == "line":
                documents.extend((path, line) for line in text.splitlines() if line.strip())
            else:
                blocks = text.replace("\r\n", "\n").split("\n\n")
                documents.extend((path, b.strip()) for b in blocks if b.strip())
    return documents


def _decoded(path: Path, encoding: str) -> str:
    """The text of ``path`` in ``encoding``, strictly: a wrong byte is an error, not a '�'."""
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except LookupError as error:
        raise ValueError(f"Unknown text encoding {encoding!r} (--encoding).") from error
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not {encoding} text (byte {error.start}: {data[error.start : error.end]!r}"
            "): a binary file, or text in another encoding. Leave the file out, or name its "
            "encoding (--encoding latin-1, ProbeSpec(encoding=...))."
        ) from error
