"""Checkpoints to sweep: which they are, the step of each, what their weights hash to, loading.

A checkpoint is named as any of:

- a Hugging Face model directory (``config.json`` and weights);
- a ``Trainer`` ``output_dir``: its ``checkpoint-N`` folders, each one checkpoint, and the
  final model ``trainer.save_model()`` wrote into the folder itself (at ``trainer_state.json``'s
  ``global_step``; when a ``checkpoint-N`` is at that step, it stands for the final model, which
  holds the same weights);
- a GGUF file (a path ending in ``.gguf``), or a directory or hub repository with
  ``gguf_file=`` naming the file in it (loaded by transformers' GGUF loader, which needs the
  ``gguf`` package);
- a hub repository id, optionally at a revision: ``EleutherAI/pythia-70m@step1000``
  (``from_pretrained(repo, revision=...)``; ``offline=True`` reads the local hub cache only).

The step of each comes from the checkpoint: ``trainer_state.json``'s ``global_step``, else a
name such as ``checkpoint-1000``, ``step1000`` (Pythia's revisions) or ``global_step1000``; or it
is given. The weights' content hash (:func:`weights_hash`) is SHA-256 over the weight files'
names and SHA-256 digests, so two checkpoints holding the same weights are recognized without
loading either.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "Checkpoint",
    "HashCache",
    "LoadOptions",
    "describe",
    "find_checkpoints",
    "fingerprint",
    "load_model",
    "step_from_name",
    "unfinished",
    "weight_files",
    "weights_hash",
]

_CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")
# step1000 (Pythia), checkpoint-1000 (Trainer), global_step1000 (DeepSpeed), stage1-step1000-…
_STEP_IN_NAME = re.compile(r"(?:^|[^A-Za-z])(?:step|checkpoint)[-_]?(\d+)")


def step_from_name(name: str) -> int | None:
    """The training step a folder, file or revision name spells, or None.

    ``checkpoint-1000``, ``step1000``, ``global_step1000`` and ``stage1-step1000-tokens4B`` all
    give 1000.
    """
    found = _STEP_IN_NAME.search(name)
    return int(found.group(1)) if found else None


def _step_of_dir(directory: Path) -> int | None:
    """``trainer_state.json``'s ``global_step``, else the step the folder's name spells."""
    state = directory / "trainer_state.json"
    if state.is_file():
        try:
            step = json.loads(state.read_text()).get("global_step")
        except (OSError, ValueError):
            step = None
        if isinstance(step, int) and not isinstance(step, bool):
            return step
    return step_from_name(directory.name)


@dataclass(frozen=True)
class Checkpoint:
    """One model to measure.

    Attributes:
        source: A local directory or a hub repository id: what ``from_pretrained`` takes.
        step: The training step it was saved at.
        revision: The hub revision (branch, tag or commit), if any.
        gguf_file: The GGUF file inside ``source``, if the weights are GGUF.
        local: Whether ``source`` is a local directory.
        final: It is (or, a ``checkpoint-N`` at the same step, stands for) the final model of a
            Trainer ``output_dir``.
    """

    source: str
    step: int
    revision: str | None = None
    gguf_file: str | None = None
    local: bool = True
    final: bool = False

    @property
    def name(self) -> str:
        """How records and messages name it: ``source[/gguf_file][@revision]``."""
        name = self.source
        if self.gguf_file:
            name = f"{name}/{self.gguf_file}"
        return f"{name}@{self.revision}" if self.revision else name


def find_checkpoints(
    specs: Sequence[str],
    *,
    steps: Sequence[int | None] | None = None,
    gguf_file: str | None = None,
) -> list[Checkpoint]:
    """The checkpoints ``specs`` name, in increasing step order.

    Args:
        specs: Model directories, Trainer output directories, ``.gguf`` files, hub ids
            (``repo`` or ``repo@revision``); see the module documentation.
        steps: One step per spec (None: the checkpoint's own), overriding what the checkpoint
            says (each spec given a step must be a single checkpoint).
        gguf_file: The GGUF file inside every directory or repository named.

    Raises:
        ValueError: A spec that names nothing loadable, a checkpoint whose step is unknown,
            two checkpoints at the same step, or ``steps`` of the wrong length.
    """
    if steps is not None and len(steps) != len(specs):
        raise ValueError(
            f"{len(steps)} --step values for {len(specs)} checkpoints: give one step per "
            "checkpoint argument, in the same order, or none."
        )
    found: list[Checkpoint] = []
    for i, spec in enumerate(specs):
        given = None if steps is None or steps[i] is None else int(steps[i])
        found.extend(_resolve(spec, given, gguf_file))
    found.sort(key=lambda c: c.step)
    for before, after in itertools.pairwise(found):
        if before.step == after.step:
            raise ValueError(
                f"Two checkpoints at step {after.step}: {before.name} and {after.name}. A sweep "
                "records one measurement per step; leave one out, or give each its step "
                "with --step."
            )
    return found


def _resolve(spec: str, given: int | None, gguf_file: str | None) -> list[Checkpoint]:
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{spec} is a file but not a .gguf file; name the model's directory instead."
            )
        folder = path.resolve().parent
        step = given if given is not None else _step_of_dir(folder)
        if step is None:
            step = step_from_name(path.stem)
        return [_with_step(Checkpoint(str(folder), step, gguf_file=path.name), spec)]
    if path.is_dir():
        folder = path.resolve()
        is_model = (folder / "config.json").is_file() or (
            gguf_file is not None and (folder / gguf_file).is_file()
        )
        subdirs = sorted(
            (d for d in folder.iterdir() if d.is_dir() and _CHECKPOINT_DIR.fullmatch(d.name)),
            key=lambda d: int(d.name.split("-")[1]),
        )
        if is_model and not subdirs:
            step = given if given is not None else _step_of_dir(folder)
            return [_with_step(Checkpoint(str(folder), step, gguf_file=gguf_file), spec)]
        if not subdirs:
            raise ValueError(
                f"{spec} is neither a model directory (no config.json) nor a Trainer output_dir "
                "(no checkpoint-N folders)."
            )
        if given is not None and not is_model:
            raise ValueError(
                f"--step names one step, but {spec} holds {len(subdirs)} checkpoints (each "
                "folder's own step is used); leave its --step out or name one folder."
            )
        found = [
            _with_step(Checkpoint(str(d), _step_of_dir(d), gguf_file=gguf_file), str(d))
            for d in subdirs
        ]
        if is_model:  # the final model trainer.save_model() wrote beside its checkpoints
            found = _with_final(found, folder, spec, given, gguf_file)
        return found
    repo, at, revision = spec.rpartition("@")
    if not at:
        repo, revision = spec, ""
    if not repo or spec.startswith((".", "/", "~")) or repo.count("/") > 1:
        raise ValueError(
            f"{spec} is not a local file or directory, nor a hub id like 'org/name' or "
            "'org/name@revision'."
        )
    step = given if given is not None else (step_from_name(revision) if revision else None)
    ckpt = Checkpoint(repo, step, revision=revision or None, gguf_file=gguf_file, local=False)
    return [_with_step(ckpt, spec)]


def _with_final(
    found: list[Checkpoint], folder: Path, spec: str, given: int | None, gguf_file: str | None
) -> list[Checkpoint]:
    """An output_dir's checkpoints and its final model; a checkpoint at its step stands for it.

    The final model's step is ``given``, else ``trainer_state.json``'s (``trainer.save_state()``
    writes it beside the model). Only that file's (or ``given``) counts: a step spelled by the
    folder's name could be any run's.
    """
    state_step = _step_of_dir(folder) if (folder / "trainer_state.json").is_file() else None
    step = given if given is not None else state_step
    if step is None:
        raise ValueError(
            f"{spec} holds {_count(len(found), 'checkpoint-N folder')} and a final model "
            "(config.json) whose step is unknown: no trainer_state.json beside it "
            "(trainer.save_state() writes it). Give the final model's step with --step N (the "
            "checkpoint-N folders keep their own), or name the checkpoint folders alone."
        )
    same = next((i for i, c in enumerate(found) if c.step == step), None)
    if same is not None:  # save_model at the step of the last save: the same weights, measured once
        found[same] = replace(found[same], final=True)
        return found
    final = Checkpoint(str(folder), step, gguf_file=gguf_file, final=True)
    return [*found, _with_step(final, spec)]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def describe(checkpoints: Sequence[Checkpoint]) -> str:
    """What a sweep found, for a message: ``3 checkpoints + the final model (step 60)``."""
    finals = [c for c in checkpoints if c.final]
    folders = [c for c in checkpoints if c.local and _CHECKPOINT_DIR.fullmatch(Path(c.source).name)]
    others = len(checkpoints) - len({id(c) for c in [*finals, *folders]})
    parts = [_count(len(folders), "checkpoint")] if folders else []
    for c in finals:
        name = Path(c.source).name
        same = f", measured as {name}" if _CHECKPOINT_DIR.fullmatch(name) else ""
        parts.append(f"the final model (step {c.step}{same})")
    if others:
        parts.append(_count(others, "model" if parts else "checkpoint"))
    return " + ".join(parts) or "no checkpoint"


def _with_step(ckpt: Checkpoint, spec: str) -> Checkpoint:
    if ckpt.step is None:
        raise ValueError(
            f"The training step of {spec} is unknown: no trainer_state.json, and no step in "
            "its name (checkpoint-N, stepN) or revision. Give it with --step N."
        )
    if ckpt.step < 0:
        raise ValueError(f"{spec}: a training step cannot be negative ({ckpt.step}).")
    return ckpt


# -- weights ----------------------------------------------------------------------------------


# the weight files from_pretrained reads, in the order it looks for them: a sharded index
# (its shards), else the single file; anything else in the folder (a sweep's own pr.safetensors
# and probe.safetensors, a Trainer's optimizer and RNG states) is not the model's weights
_WEIGHT_NAMES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
_SHARD = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")
# a safetensors header longer than this is not one being written but a damaged file
_MAX_HEADER = 100 * 2**20


def weight_files(directory: str | Path, gguf_file: str | None = None) -> list[Path]:
    """The files holding a model directory's weights, as ``from_pretrained`` chooses them.

    The GGUF file if one is named; else the shards a ``model.safetensors.index.json`` lists, or
    ``model.safetensors``; else the same for ``pytorch_model.bin``. Nothing else in the folder
    is the model's: a Trainer checkpoint's optimizer, scheduler and RNG states, and a sweep's
    own ``pr.safetensors`` and ``probe.safetensors`` written into the model's folder. The shards
    an index lists are returned whether or not they exist yet (see :func:`unfinished`).

    Raises:
        FileNotFoundError: No weight file.
    """
    directory = Path(directory)
    if gguf_file is not None:
        path = directory / gguf_file
        if not path.is_file():
            raise FileNotFoundError(f"No GGUF file {gguf_file} in {directory}.")
        return [path]
    for index, single in _WEIGHT_NAMES:
        if (directory / index).is_file():
            return [directory / name for name in _index_shards(directory / index)]
        if (directory / single).is_file():
            return [directory / single]
    raise FileNotFoundError(
        f"No weights in {directory}: expected model.safetensors or pytorch_model.bin (or a "
        "sharded model's index file beside its shards)."
    )


def _index_shards(index: Path) -> list[str]:
    """The shard names a sharded checkpoint's index lists ([] while it is unreadable)."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (OSError, ValueError, AttributeError):
        return []
    return sorted({str(name) for name in weight_map.values()})


def unfinished(directory: str | Path, gguf_file: str | None = None) -> str | None:
    """Why a local checkpoint looks still being written, or None when it looks complete.

    A sweep that runs while training saves must not measure, or record the digest of, a
    checkpoint half written. Said unfinished: shards without their index yet (the index comes
    last), an index that is unreadable or lists a shard not there, a safetensors file shorter or
    longer than its header describes (the header is written first), and a Trainer
    ``checkpoint-N`` that has its ``training_args.bin`` but not yet its ``trainer_state.json``
    (which the Trainer writes last). A damaged file (no plausible safetensors header) is not
    unfinished: it fails when loaded, and the sweep says so.
    """
    directory = Path(directory)
    if gguf_file is None:
        names = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
        indexed = any(index in names for index, _ in _WEIGHT_NAMES)
        single = any(file in names for _, file in _WEIGHT_NAMES)
        if not indexed and not single and any(_SHARD.fullmatch(n) for n in names):
            return "its weight shards are there but not yet their index file"
        for index, _ in _WEIGHT_NAMES:
            if index in names and not _index_shards(directory / index):
                return f"its {index} is unreadable or lists no shard"
        if (
            _CHECKPOINT_DIR.fullmatch(directory.name)
            and "training_args.bin" in names
            and "trainer_state.json" not in names
        ):
            return "the Trainer has not yet written its trainer_state.json (it comes last)"
    try:
        files = weight_files(directory, gguf_file)
    except FileNotFoundError:
        return None  # no weights at all: loading fails, and says so
    for path in files:
        if not path.is_file():
            return f"{path.name}, listed by its index, is not there yet"
        if path.suffix == ".safetensors":
            problem = _safetensors_unfinished(path)
            if problem is not None:
                return problem
    return None


def _safetensors_unfinished(path: Path) -> str | None:
    """Whether ``path`` is shorter or longer than the header it starts with describes."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} is {size} bytes, less than a header"
        length = int.from_bytes(head, "little")
        if length > _MAX_HEADER:
            return None  # no plausible header: a damaged file, which fails when loaded
        if 8 + length > size:
            return f"{path.name} is {size} bytes, less than its {8 + length}-byte header"
        try:
            header = json.loads(f.read(length))
        except ValueError:
            return None  # damaged, as above
    if not isinstance(header, dict):
        return None
    ends = [
        entry["data_offsets"][1]
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
    ]
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        return f"{path.name} is {size} bytes, but its header describes {expected}"
    return None


def fingerprint(directory: str | Path, gguf_file: str | None = None) -> list[tuple[Any, ...]]:
    """Each weight file's name, size, modification time and inode: what changes when written.

    Equal before the hash and after the load, the weights measured are the weights hashed.
    """
    found = []
    for path in weight_files(directory, gguf_file):
        stat = os.stat(path)
        found.append((path.name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return found


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class HashCache:
    """SHA-256 digests of files, remembered by real path, size and modification time.

    A sweep run again reads no weight file twice: a file whose size and modification time
    are unchanged keeps its digest.

    Args:
        path: The JSON file the digests are kept in (None: in memory only).
    """

    path: Path | None = None
    digests: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.path is not None and self.path.is_file():
            try:
                self.digests = dict(json.loads(self.path.read_text()))
            except (OSError, ValueError):
                self.digests = {}  # a damaged cache costs a re-hash, nothing more

    def sha256(self, path: Path) -> str:
        """The digest of ``path`` (computed if the file is new or changed)."""
        real = os.path.realpath(path)
        stat = os.stat(real)
        key = [stat.st_size, stat.st_mtime_ns]
        known = self.digests.get(real)
        if known is not None and known[:2] == key:
            return known[2]
        digest = _file_sha256(Path(real))
        self.digests[real] = [*key, digest]
        if self.path is not None:
            self.path.write_text(json.dumps(self.digests, indent=0))
        return digest


def weights_hash(
    directory: str | Path, gguf_file: str | None = None, cache: HashCache | None = None
) -> str:
    """SHA-256 over the names and SHA-256 digests of a model directory's weight files.

    Equal hashes mean the same weights, whatever folder or step they were saved under.
    """
    cache = cache or HashCache()
    h = hashlib.sha256()
    for path in weight_files(directory, gguf_file):
        h.update(f"{path.name}\0{cache.sha256(path)}\n".encode())
    return h.hexdigest()


# -- loading ----------------------------------------------------------------------------------

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


@dataclass(frozen=True)
class LoadOptions:
    """How checkpoints are loaded (``from_pretrained``'s options).

    Attributes:
        dtype: 'auto' (the checkpoint's own), or a torch dtype name.
        device: Where the model runs ('cpu', 'cuda', 'cuda:1', …); default: CUDA if available.
        device_map: Passed to ``from_pretrained`` ('auto': accelerate spreads a model too large
            for one device over the GPUs and CPU); then ``device`` is not used.
        cache_dir: The hub cache to use instead of the default one.
        offline: Read hub checkpoints from the local cache only (``local_files_only``).
        trust_remote_code: Let ``from_pretrained`` run a repository's own modelling code.
    """

    dtype: str = "auto"
    device: str | None = None
    device_map: str | None = None
    cache_dir: str | None = None
    offline: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {self.dtype!r}; choose one of {DTYPES}.")

    def hub_kwargs(self, ckpt: Checkpoint) -> dict[str, Any]:
        """The ``from_pretrained`` arguments that locate ``ckpt``'s files."""
        kwargs: dict[str, Any] = {}
        if ckpt.revision:
            kwargs["revision"] = ckpt.revision
        if ckpt.gguf_file:
            kwargs["gguf_file"] = ckpt.gguf_file
        if not ckpt.local:
            if self.cache_dir:
                kwargs["cache_dir"] = self.cache_dir
            if self.offline:
                kwargs["local_files_only"] = True
        if self.trust_remote_code:
            kwargs["trust_remote_code"] = True
        return kwargs


def _dtype_keyword() -> str:
    """``dtype`` (transformers >= 4.56) or its older name ``torch_dtype``."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def load_model(ckpt: Checkpoint, options: LoadOptions | None = None) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` on the checkpoint, placed and in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    options = options or LoadOptions()
    kwargs = options.hub_kwargs(ckpt)
    kwargs[_dtype_keyword()] = "auto" if options.dtype == "auto" else getattr(torch, options.dtype)
    if options.device_map:
        kwargs["device_map"] = options.device_map
    if kwargs.get("local_files_only"):
        # transformers looks for a PEFT adapter with these alone (not local_files_only):
        # without them an offline load asks the hub for adapter_config.json, retrying ~10 s
        kwargs["adapter_kwargs"] = {"local_files_only": True, "cache_dir": options.cache_dir}
    model = AutoModelForCausalLM.from_pretrained(ckpt.source, **kwargs)
    if not options.device_map:
        device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
    return model.eval()


def hub_snapshot(ckpt: Checkpoint, options: LoadOptions | None = None) -> Path:
    """The local hub-cache folder of a hub checkpoint already downloaded (no network)."""
    from huggingface_hub import snapshot_download

    options = options or LoadOptions()
    return Path(
        snapshot_download(
            ckpt.source,
            revision=ckpt.revision,
            cache_dir=options.cache_dir,
            local_files_only=True,
        )
    )
