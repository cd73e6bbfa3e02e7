"""Meshes: a model split over processes by tensor parallelism, measured as one process would.

Under DDP, FSDP and ZeRO-3 every process runs the whole forward on its own batch, so the probe
is dealt over every process and the statistics summed over all of them. Under tensor
parallelism (torch's DTensor ``parallelize_module``, the plans of torchtitan, of Lightning's
``ModelParallelStrategy`` and of transformers' ``tp_plan``) the processes of one
tensor-parallel group run *one* forward together, so they must all feed the same batch: fed
different batches, the collectives inside the layers would mix them. A :class:`Mesh` says, for
this process:

* **The probe's shard:** over the data-parallel dimension(s) of the mesh only (every
  tensor-parallel rank of a group measures the same rows).
* **The reduction:** over the data-parallel process group only. Each tensor-parallel group then
  holds the same statistics (its ranks saw the same hidden states), reduced once within its
  own data-parallel group; no data-parallel dimension: nothing is reduced.
* **Whole tensors** (:func:`whole`, run in the capture's hooks on every rank alike): a hidden
  state that arrives as a DTensor is gathered with ``full_tensor()``; a local shard of the
  sequence (sequence parallelism hands plain ``(batch, length / tp, d)`` tensors between
  blocks) is gathered over the tensor-parallel mesh; a DTensor parameter (the final norm's
  weight, the head's) is read whole. Every entry is then the whole sequence, paired with its
  own targets, as on one process.

The mesh is the one the model's DTensor parameters live on (:func:`model_mesh`), or the one the
user passes (``LawWatch(mesh=..., data_parallel=...)``). Its data-parallel dimensions are
``data_parallel`` when given, else the dimensions named in :data:`DATA_PARALLEL_NAMES` and
those the model's parameters do not live on (they are replicated there), and the one dimension
of an FSDP model's unnamed mesh. A mesh that lawwatch cannot measure exactly is refused when
the monitor is built (:func:`find_mesh`), naming it: a dimension of pipeline or context
parallelism (:data:`UNMEASURED`), parameters on several meshes, a mesh that is not the whole
world, unnamed dimensions it cannot tell apart, or a ``data_parallel`` the mesh lacks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from lawwatch.watch.distributed import Layout

__all__ = [
    "DATA_PARALLEL_NAMES",
    "UNMEASURED",
    "Mesh",
    "find_mesh",
    "model_mesh",
    "sequence_mesh",
    "whole",
    "whole_param",
]

DATA_PARALLEL_NAMES = ("dp", "dp_replicate", "dp_shard", "data_parallel", "ddp", "fsdp", "hsdp")
"""Mesh dimension names read as data parallel (torchtitan's, Lightning's, accelerate's)."""

UNMEASURED = {
    "pp": "pipeline parallelism",
    "pipeline_parallel": "pipeline parallelism",
    "cp": "context parallelism",
    "context_parallel": "context parallelism",
}
"""Mesh dimensions lawwatch refuses, by name: what they split is not gathered (docs/scale.md)."""


@functools.cache
def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor``."""
    cls = _dtensor_class()
    return cls is not None and isinstance(value, cls)


def whole_param(value: torch.Tensor) -> torch.Tensor:
    """``value`` whole: a DTensor's ``full_tensor()`` (a collective when it is sharded)."""
    return value.full_tensor() if is_dtensor(value) else value


def model_mesh(model: nn.Module) -> Any | None:
    """The device mesh of ``model``'s DTensor parameters, or None when it has none.

    Raises:
        ValueError: The parameters live on several meshes (lawwatch cannot tell which group
            runs one forward together).
    """
    meshes: dict[tuple, tuple[str, Any]] = {}
    for name, param in model.named_parameters():
        if is_dtensor(param):
            mesh = param.device_mesh
            key = (tuple(mesh.mesh.flatten().tolist()), mesh.mesh_dim_names)
            meshes.setdefault(key, (name, mesh))
    if len(meshes) > 1:
        seen = "; ".join(f"{name!r} on {mesh}" for name, mesh in meshes.values())
        raise ValueError(
            f"The parameters of {type(model).__name__} live on {len(meshes)} device meshes "
            f"({seen}); lawwatch measures a model on one mesh (data parallel × tensor "
            "parallel), where it can tell which processes run one forward together."
        )
    return next(iter(meshes.values()))[1] if meshes else None


class Mesh:
    """A model's mesh: the data-parallel dimensions the probe is dealt over, the rest joined.

    Args:
        root: The whole mesh (every process of the job).
        data: Its data-parallel dimensions (may be none).
    """

    def __init__(self, root: Any, data: tuple[str, ...]) -> None:
        self.root = root
        self.data = data
        names = tuple(root.mesh_dim_names or ())
        self.joint = tuple(n for n in names if n not in data)
        self._placed: tuple[tuple[int, int], Any] | None = None

    def __repr__(self) -> str:
        return f"Mesh({self.root}, data parallel over {self.data or 'no dimension'})"

    def layout(self, where: Layout) -> Layout:
        """``where`` with this process's probe shard and data-parallel group."""
        if self._placed is None:
            self._placed = self._place()
        shard, group = self._placed
        return replace(where, shard=shard, group=group)

    def _place(self) -> tuple[tuple[int, int], Any]:
        if not self.data:  # every process runs every forward: alone in its "reduction"
            return (0, 1), _alone()
        sub = self.root[self.data]
        if len(self.data) > 1:
            sub = sub._flatten("_".join(self.data) + "_lawwatch")
        return (sub.get_local_rank(), sub.size()), sub.get_group()


_ALONE: Any | None = None


def _alone() -> Any:
    """A process group of this process alone (its solve is then every entry's)."""
    global _ALONE
    if _ALONE is None:
        rank = torch.distributed.get_rank()
        _ALONE = torch.distributed.new_group([rank], use_local_synchronization=True)
    return _ALONE


def find_mesh(
    model: nn.Module,
    mesh: Any | None = None,
    data_parallel: str | Sequence[str] | None = None,
    *,
    fsdp: bool = False,
) -> Mesh | None:
    """The mesh ``model`` is measured on, or None (every process data parallel, as before).

    Args:
        model: The module the probe runs through.
        mesh: A ``DeviceMesh`` (its root is taken), else the mesh of the model's DTensor
            parameters (:func:`model_mesh`).
        data_parallel: The mesh dimension name(s) the probe is dealt over; default: see the
            module docstring.
        fsdp: The model is FSDP-sharded (an unnamed one-dimensional mesh is then its data
            parallel one).

    Raises:
        ValueError: A mesh lawwatch cannot measure exactly, naming it and the fix.
    """
    found = model_mesh(model)
    if mesh is None and found is None:
        if data_parallel is not None:
            raise ValueError(
                f"data_parallel={data_parallel!r} names a dimension of a device mesh, but "
                "the model has no DTensor parameter and no mesh= was given; pass mesh=."
            )
        return None
    given = mesh if mesh is not None else found
    root = given._get_root_mesh() if hasattr(given, "_get_root_mesh") else given
    names = tuple(root.mesh_dim_names or ())
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if root.size() != world:
        raise ValueError(
            f"The device mesh {root} holds {root.size()} processes of the job's {world}; "
            "lawwatch measures on a mesh of every process: pass mesh= the whole mesh."
        )
    if not names:
        if root.ndim != 1 or mesh is not None or data_parallel is not None:
            raise ValueError(
                f"The device mesh {root} has no dimension names, so lawwatch cannot tell its "
                "data-parallel dimension from its tensor-parallel one; build it with "
                "init_device_mesh(..., mesh_dim_names=(...)) and pass data_parallel=."
            )
        if fsdp:
            return None  # FSDP over every process: data parallel, as without a mesh
        return Mesh(root, ())  # one unnamed tensor-parallel dimension over every process
    refused = [f"{n!r} ({UNMEASURED[n]})" for n in names if n in UNMEASURED]
    if refused:
        raise ValueError(
            f"The device mesh {root} has the dimension {', '.join(refused)}, which lawwatch "
            "does not measure: the processes along it hold different blocks or different "
            "parts of the sequence inside attention. Measure a checkpoint instead (lawwatch "
            "analyze); see docs/scale.md."
        )
    if data_parallel is not None:
        data = (data_parallel,) if isinstance(data_parallel, str) else tuple(data_parallel)
        missing = [n for n in data if n not in names]
        if missing:
            raise ValueError(
                f"data_parallel={data_parallel!r}: the device mesh {root} has no dimension "
                f"{missing[0]!r} (its dimensions: {names})."
            )
    else:
        on = set(found.mesh_dim_names or ()) if found is not None else set()
        if fsdp and found is not None and found.ndim == 1:
            on = set()  # FSDP's own dimension: data parallel
        data = tuple(n for n in names if n in DATA_PARALLEL_NAMES or (found and n not in on))
    return Mesh(root, data)


def sequence_mesh(model: nn.Module, *, fsdp: bool = False) -> Any | None:
    """The one-dimensional tensor-parallel mesh a local sequence shard is gathered over.

    The mesh of the model's DTensor parameters when it has one dimension that is not data
    parallel by name (:data:`DATA_PARALLEL_NAMES`) and, unnamed, not an FSDP model's
    (``fsdp``); None otherwise (a local tensor of another
    length than the sequence is then refused by the capture, not gathered).
    """
    try:
        found = model_mesh(model)
    except ValueError:
        return None
    if found is None:
        return None
    names = tuple(found.mesh_dim_names or ())
    joint = [n for n in names if n not in DATA_PARALLEL_NAMES]
    if found.ndim == 1 and ((names and not joint) or (not names and fsdp)):
        return None  # FSDP's own mesh: every process runs its own whole sequences
    if found.ndim == 1:
        return found
    return found[joint[0]] if len(joint) == 1 else None


def whole(value: Any, shape: tuple[int, int], mesh: Any | None) -> Any:
    """A ``(batch, length, d)`` hidden state whole, from a DTensor or a local sequence shard.

    A DTensor is gathered (``full_tensor()``); a plain ``(batch, l, d)`` tensor whose ``l`` is
    this rank's share of ``length`` over ``mesh`` (``torch.chunk``'s split, as ``Shard(1)``
    places it) is gathered over ``mesh``; anything else is returned as it is. Decided from
    shapes alone, which every rank of a tensor-parallel group sees alike, so every rank enters
    the same gathers. ``shape``: the batch's ``(batch, length)``.
    """
    if not isinstance(value, torch.Tensor):
        return value
    if is_dtensor(value):
        return value.full_tensor()
    batch, length = shape
    if mesh is None or value.ndim != 3 or value.shape[0] != batch or value.shape[1] == length:
        return value
    from torch.distributed.tensor import DTensor, Shard

    parts = mesh.size()
    per = math.ceil(length / parts)
    mine = max(0, min(per, length - per * mesh.get_local_rank()))
    if value.shape[1] != mine:
        return value
    d = value.shape[2]
    local = value.contiguous()
    spread = DTensor.from_local(
        local,
        mesh,
        [Shard(1)],
        run_check=False,
        shape=torch.Size((batch, length, d)),
        stride=(length * d, d, 1),
    )
    return spread.full_tensor()
