"""Loading the tokenizer a probe's texts are tokenized with: by name, or a checkpoint's own."""

from __future__ import annotations

from typing import Any

from lawwatch.checkpoints import Checkpoint, LoadOptions

__all__ = ["load_tokenizer"]


def load_tokenizer(name: str | Checkpoint, options: LoadOptions | None = None) -> Any:
    """``AutoTokenizer.from_pretrained`` of a tokenizer name or path, or of a checkpoint's own.

    Args:
        name: A directory or hub id, or a checkpoint (its source, revision and GGUF file).
        options: The hub cache and offline mode to load with.

    Raises:
        ValueError: No tokenizer could be loaded (the message says to pass ``--tokenizer``).
    """
    from transformers import AutoTokenizer

    options = options or LoadOptions()
    if isinstance(name, Checkpoint):
        source, kwargs = name.source, options.hub_kwargs(name)
    else:
        source = name
        kwargs = {"cache_dir": options.cache_dir} if options.cache_dir else {}
        if options.offline:
            kwargs["local_files_only"] = True
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"No tokenizer could be loaded from {source} ({type(error).__name__}: {error}); "
            "name one with --tokenizer (a directory or hub id), or give a probe file with "
            "--probe."
        ) from error
