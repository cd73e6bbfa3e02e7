"""Loading the tokenizer a probe's texts are tokenized with: by name, or a checkpoint's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lawwatch.checkpoints import Checkpoint, LoadOptions

__all__ = ["load_tokenizer"]


def load_tokenizer(
    name: str | Checkpoint, options: LoadOptions | None = None, *, gguf_file: str | None = None
) -> Any:
    """``AutoTokenizer.from_pretrained`` of a tokenizer name or path, or of a checkpoint's own.

    Args:
        name: A directory or hub id, a ``.gguf`` file, or a checkpoint (its source, revision
            and GGUF file).
        options: The hub cache and offline mode to load with.
        gguf_file: The GGUF file inside ``name`` (a directory or hub id) to read the tokenizer of.

    Raises:
        ValueError: No tokenizer could be loaded (the message says to pass ``--tokenizer``), or
            a GGUF tokenizer without the ``gguf`` package (the message says to install it).
    """
    from transformers import AutoTokenizer

    options = options or LoadOptions()
    if isinstance(name, Checkpoint):
        source, kwargs = name.source, options.hub_kwargs(name)
    else:
        source = name
        if gguf_file is None and source.lower().endswith(".gguf") and Path(source).is_file():
            source, gguf_file = str(Path(source).resolve().parent), Path(source).name
        kwargs = {"cache_dir": options.cache_dir} if options.cache_dir else {}
        if options.offline:
            kwargs["local_files_only"] = True
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
    if kwargs.get("gguf_file"):
        _require_gguf(f"{source}/{kwargs['gguf_file']}")
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"No tokenizer could be loaded from {source} ({type(error).__name__}: {error}); "
            "name one with --tokenizer (a directory or hub id), or give a probe file with "
            "--probe."
        ) from error


def _require_gguf(what: str) -> None:
    """Refuse, in words, a GGUF tokenizer without the package transformers reads GGUF with."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ValueError(
            f"Reading the tokenizer of {what} needs the gguf package, which is not installed: "
            "pip install gguf (or give a tokenizer directory with --tokenizer)."
        ) from None
