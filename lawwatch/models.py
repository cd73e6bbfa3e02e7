"""What lawwatch knows about model wrappers and model families, in one place.

**Wrappers.** Training frameworks wrap the model they train:

* DDP, ``DataParallel``, DeepSpeed's engine and ``torch.compile`` replicate or compile it
  without changing what it computes. They are stripped before a probe forward: DDP's forward
  would broadcast buffers, and every replica holds the full weights anyway.
* PEFT's ``PeftModel`` with adapters inside the model's modules (LoRA, IA³, …) is stripped
  too: the Hugging Face model within runs the adapters, with ``logits_to_keep=1``.
* FSDP (1 and 2) and DeepSpeed ZeRO-3 shard the weights, so every forward is a collective that
  must enter at the *root* module: its forward hooks gather the parameters no inner unit owns
  (embeddings, final norm), and FSDP2 makes the first module ever to run forward its root. A
  sharded model is measured as the framework returned it, from its root.
* FSDP, activation checkpointing and ``torch.compile`` insert name components
  (:data:`WRAPPER_NAMES`) into ``named_modules()``; lawwatch's module names leave them out.

**Families.** A Hugging Face model (a ``transformers.PreTrainedModel``) runs from its root with
``logits_to_keep=1`` when its forward takes it (no ``(batch, length, vocab)`` logits), else as
its base model (no LM head). Its final norm goes by one of :data:`FINAL_NORM_NAMES`, its
positions by ``config.n_positions`` or ``config.max_position_embeddings`` (recurrent families
such as Mamba and RWKV have no limit), its vocabulary by ``get_input_embeddings()``. Hugging
Face's RWKV rescales some weights on its first forward in eval mode; see
:func:`undo_inference_rescaling`.

**The head** the logit lens reads through (:func:`unembedding`): ``get_output_embeddings()``,
else a module named one of :data:`HEAD_NAMES`, with the logit scaling and soft-capping the
model's config declares.

**The probe meets the model** in :func:`check_probe`: once per measurement, before any
forward, so a probe the model cannot run fails with the fix instead of a bare ``IndexError``.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from lawwatch.watch.mesh import is_dtensor, whole_param

if TYPE_CHECKING:
    from lawwatch.probe import ProbeSet

# attribute names of the final norm of a Hugging Face base model, most common first
FINAL_NORM_NAMES = ("ln_f", "norm", "final_layer_norm", "norm_f", "ln_out", "final_layernorm")
# wrapper modules that insert a name component without changing the computation
WRAPPER_NAMES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
# the token embedding of a model without get_input_embeddings (nanoGPT, Llama, torchtitan, …)
TOKEN_EMBEDDING_NAMES = ("wte", "embed_tokens", "tok_embeddings", "token_embedding", "tok_emb")
# a learned absolute-position table of such a model (nanoGPT's wpe): its rows bound the length
POSITION_EMBEDDING_NAMES = ("wpe", "position_embeddings", "pos_emb")
# config fields of a Hugging Face model's position limit (read only where the config sets them
# itself: RWKV maps max_position_embeddings to context_length, which limits no CPU forward)
_POSITION_FIELDS = ("n_positions", "max_position_embeddings")
# where the head of a model without get_output_embeddings lives, most common first
HEAD_NAMES = ("lm_head", "head", "output", "embed_out", "unembed")


# -- wrappers ---------------------------------------------------------------------------------


def clean_name(name: str) -> str:
    """A module name without the components wrappers insert (:data:`WRAPPER_NAMES`)."""
    return ".".join(p for p in name.split(".") if p not in WRAPPER_NAMES)


def _fsdp_classes() -> tuple[type, ...]:
    """FSDP1's wrapper class and FSDP2's ``FSDPModule`` mixin (what this torch has of them)."""
    classes: list[type] = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        classes.append(FullyShardedDataParallel)
    except ImportError:  # torch built without distributed
        pass
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        try:  # torch < 2.6
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            FSDPModule = None
    if FSDPModule is not None:
        classes.append(FSDPModule)
    return tuple(classes)


def _injected_peft(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT wrapper whose adapters live inside the model's own modules.

    LoRA, IA³ and the other tuners replace layers inside the model, so the model within runs
    the adapters; prompt-learning adapters add virtual tokens in the wrapper's forward instead.
    """
    peft = sys.modules.get("peft")  # a model can only be one if peft was imported
    if peft is None or not isinstance(model, peft.PeftModel):
        return False
    return not getattr(model.active_peft_config, "is_prompt_learning", True)


def _strip_replication(model: nn.Module) -> nn.Module:
    """Remove DDP / DataParallel / DeepSpeedEngine / ``torch.compile`` / PEFT wrappers."""
    while True:
        replicated = isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel)
        if replicated or type(model).__name__ == "DeepSpeedEngine":  # DeepSpeed is optional
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        elif _injected_peft(model):  # the model inside runs the adapters, logits_to_keep too
            model = model.get_base_model()
        else:
            return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s weights are sharded across processes (FSDP 1/2, DeepSpeed ZeRO-3).

    Raises:
        ValueError: Inner modules are FSDP-sharded but ``model`` itself is not the FSDP root,
            so no forward through it can gather every parameter.
    """
    fsdp = _fsdp_classes()
    if fsdp and isinstance(model, fsdp):
        return True
    if fsdp and any(isinstance(m, fsdp) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} holds FSDP-sharded modules but is not itself the FSDP root; "
            "pass LawWatch the model as the framework returned it (after accelerator.prepare, "
            "or after fully_shard on the whole model)."
        )
    first = next(model.parameters(), None)
    return first is not None and hasattr(first, "ds_id")  # a ZeRO-3 partitioned parameter


def measured_module(
    model: nn.Module, unwrap: Callable[[nn.Module], nn.Module] | None = None
) -> nn.Module:
    """The module a probe forward runs through, for ``model`` as training wraps it.

    Replication wrappers are stripped (DDP, DataParallel, DeepSpeedEngine, ``torch.compile``,
    PEFT's ``PeftModel`` around adapters injected into the model's modules);
    anything else — a sharded FSDP or ZeRO-3 root included, whose forward the capture runs from
    the root with ``logits_to_keep=1`` — is returned as is.

    Raises:
        ValueError: Inner modules are FSDP-sharded but the model is not the FSDP root.

    Args:
        model: The model as the training framework holds it.
        unwrap: Applied first, for wrappers not recognized here.
    """
    if unwrap is not None:
        model = unwrap(model)
    model = _strip_replication(model)
    is_sharded(model)  # refuses a model whose shards no forward through it can gather
    return model


# -- pipeline stages --------------------------------------------------------------------------

# module attributes a pipeline stage sets to None when it does not hold that part of the model
_STAGE_PARTS = FINAL_NORM_NAMES + TOKEN_EMBEDDING_NAMES + ("lm_head", "output")


def pipeline_stage(model: nn.Module) -> str | None:
    """What shows ``model`` to be one stage of a pipeline (its blocks not all here), or None.

    Read off the module tree: a final norm, token embedding or head set to None (torchtitan's
    stages), a block container holding ``nn.Identity`` or None among its blocks, or a
    ``ModuleDict`` of blocks keyed by layer numbers that do not start at 0 or have gaps.
    """
    for name, module in model.named_modules():
        where = clean_name(name) or type(model).__name__
        for key, child in module._modules.items():
            if child is None and key in _STAGE_PARTS:
                return f"{where}.{key} is None"
        if isinstance(module, nn.ModuleList | nn.ModuleDict) and len(module) > 1:
            children = list(module._modules.items())
            gone = [k for k, c in children if c is None or isinstance(c, nn.Identity)]
            if gone and len(gone) < len(children):
                return f"{where}[{gone[0]}] is {type(module._modules[gone[0]]).__name__}"
            keys = [k for k, _ in children]
            if isinstance(module, nn.ModuleDict) and all(k.isdigit() for k in keys):
                numbers = sorted(int(k) for k in keys)
                if numbers != list(range(len(numbers))):
                    return f"{where} holds the layers {numbers[0]} … {numbers[-1]} only"
    return None


def check_whole(model: nn.Module) -> None:
    """Refuse a pipeline-parallel stage: lawwatch measures a model whose blocks are all here.

    Raises:
        ValueError: The evidence (:func:`pipeline_stage`) and what to do instead.
    """
    found = pipeline_stage(model)
    if found is not None:
        raise ValueError(
            f"{type(model).__name__} looks like one stage of a pipeline ({found}): under "
            "pipeline parallelism each process holds some of the blocks, and lawwatch measures "
            "the residual stream of every block on each process. Measure a checkpoint of the "
            "whole model instead (lawwatch analyze); see docs/scale.md, 'Pipeline parallelism'."
        )


# -- families ---------------------------------------------------------------------------------


def base_model(model: nn.Module) -> nn.Module:
    """The body of a Hugging Face model without its LM head (so no vocabulary logits)."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def is_hf(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``PreTrainedModel``.

    Without importing transformers: a model can only be one if transformers was imported.
    """
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


# Hugging Face families whose `output_hidden_states` holds the block outputs and the final
# norm's output but not the embeddings (checked against transformers 5 in tests/test_entries.py)
HIDDEN_STATES_WITHOUT_EMBEDDINGS = frozenset({"mamba", "mamba2", "falcon_mamba", "rwkv"})


def hidden_states_skip_embeddings(model: nn.Module) -> bool:
    """Whether ``model``'s ``output_hidden_states`` omits the embeddings (Mamba, RWKV).

    Such a model's ``hidden_states[k]`` is block ``k+1``'s output for ``k < L`` and the final
    norm's output for ``k = L``; other models' start with the embeddings.
    """
    config = getattr(base_model(model), "config", None)
    return getattr(config, "model_type", None) in HIDDEN_STATES_WITHOUT_EMBEDDINGS


def accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model``'s forward takes keyword ``name`` (looking inside an FSDP1 wrapper)."""
    inner = model.module if type(model).__name__ == "FullyShardedDataParallel" else model
    try:
        return name in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


@contextmanager
def undo_inference_rescaling(model: nn.Module) -> Iterator[None]:
    """On exit, undo the weight rescaling a model did for inference inside the block.

    Hugging Face's RWKV divides some weights by powers of two on its first forward in eval
    mode and multiplies them back only on the next forward in train mode, so a checkpoint saved
    between a snapshot and that forward would hold the divided weights. On exit every module
    whose ``layers_are_rescaled`` flag changed inside is rescaled back (``_rescale_layers``
    follows the module's train/eval flag, so restore those first: exit this context last).
    Powers of two make the round trip exact.
    """
    rescaled = {
        m: m.layers_are_rescaled for m in model.modules() if hasattr(m, "layers_are_rescaled")
    }
    try:
        yield
    finally:
        for module, before in rescaled.items():
            if module.layers_are_rescaled != before and callable(
                getattr(module, "_rescale_layers", None)
            ):
                module._rescale_layers()


def max_positions(model: nn.Module) -> tuple[int, str] | None:
    """The longest sequence ``model`` can run, and where that limit is read; None: no limit.

    A Hugging Face model: ``config.n_positions`` or ``config.max_position_embeddings`` where
    the config sets it (recurrent families such as Mamba and RWKV have none). Any other
    module: the rows of a position-embedding table named in :data:`POSITION_EMBEDDING_NAMES`.
    """
    config = getattr(base_model(model), "config", None)
    if config is not None:
        # what the config set itself, not attribute_map aliases (RWKV's context_length)
        fields = getattr(config, "__dict__", None) or {}
        for name in _POSITION_FIELDS:
            value = fields.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, f"config.{name}"
        if is_hf(base_model(model)):
            return None
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in (
            POSITION_EMBEDDING_NAMES
        ):
            return module.num_embeddings, f"the position embedding {clean_name(name)!r}"
    return None


def embedding_rows(model: nn.Module) -> tuple[int, str] | None:
    """How many token ids ``model`` embeds, and the embedding that says so; None: unknown.

    ``get_input_embeddings()`` where the model has it (every Hugging Face model); otherwise an
    ``nn.Embedding`` named in :data:`TOKEN_EMBEDDING_NAMES`, or the model's only
    ``nn.Embedding``. With several unnamed ones no guess is made (one may hold positions).
    """
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            embedding = get()
        except (NotImplementedError, AttributeError):  # PreTrainedModel's default raises
            embedding = None
        rows = getattr(embedding, "num_embeddings", None)
        if isinstance(rows, int):
            return rows, "get_input_embeddings()"
    embeddings = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    named = [(n, m) for n, m in embeddings if n.rsplit(".", 1)[-1] in TOKEN_EMBEDDING_NAMES]
    chosen = named[:1] or (embeddings if len(embeddings) == 1 else [])
    if not chosen:
        return None
    name, module = chosen[0]
    return module.num_embeddings, f"the embedding {clean_name(name)!r}"


def check_probe(model: nn.Module, probe: ProbeSet) -> None:
    """Refuse a probe that ``model`` cannot run: sequences too long, token ids out of range.

    Give it the *whole* probe (not a process's shard), so every process of a distributed run
    decides alike, as :func:`lawwatch.measurement.prepare` does. Limits lawwatch cannot read (see
    :func:`max_positions`, :func:`embedding_rows`) are not checked.

    Raises:
        ValueError: The probe's longest sequence exceeds the model's positions, or it holds a
            token id beyond the model's embedding; the message names the fix.
    """
    if len(probe) == 0:
        return
    name = type(model).__name__
    limit = max_positions(model)
    longest = int(probe.attention_mask.sum(dim=1).max())
    if limit is not None and longest > limit[0]:
        raise ValueError(
            f"The probe's longest sequence holds {longest} tokens but {name} runs at most "
            f"{limit[0]} positions ({limit[1]}); build the probe with max_length={limit[0]} "
            f"(ProbeSet.from_texts / from_dataset) or seq_len={limit[0]} (from_token_file), "
            "or cut the rows you pass to ProbeSet.from_tokens."
        )
    rows = embedding_rows(model)
    top = int(probe.input_ids.max())
    if rows is not None and top >= rows[0]:
        raise ValueError(
            f"The probe holds token id {top} but {name}'s embedding has {rows[0]} rows "
            f"({rows[1]}); build the probe with the model's own tokenizer."
        )


# -- the head ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unembedding:
    """The model's read-out after its final norm: ``logits = cap·tanh(scale·(W h + b) / cap)``.

    Attributes:
        module: The head (``weight`` ``(V, d)``, optional ``bias`` ``(V,)``), read when used.
        name: Where it was found, for messages.
        scale: Multiplies the logits (Cohere's ``logit_scale``, 1 / Granite's
            ``logits_scaling``); 1 for most models.
        softcap: Gemma 2's ``final_logit_softcapping``, or None.
    """

    module: nn.Module
    name: str
    scale: float = 1.0
    softcap: float | None = None
    _whole: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @property
    def weight(self) -> torch.Tensor:
        """``(V, d)`` the head's weight (detached), whole.

        A vocabulary-parallel head (a DTensor weight, e.g. ``ColwiseParallel`` on the LM head)
        is gathered with ``full_tensor()`` at the first read, once for this object's life (one
        snapshot): a collective over its mesh, entered by every rank of a tensor-parallel
        group alike. The lens is then exact: its softmax runs over the whole vocabulary.
        """
        return self._read("weight")

    @property
    def bias(self) -> torch.Tensor | None:
        """``(V,)`` the head's bias, or None."""
        bias = getattr(self.module, "bias", None)
        return self._read("bias") if isinstance(bias, torch.Tensor) else None

    def _read(self, name: str) -> torch.Tensor:
        value = getattr(self.module, name).detach()
        if not is_dtensor(value):
            return value
        if name not in self._whole:
            self._whole[name] = whole_param(value)
        return self._whole[name]


def unembedding(model: nn.Module, head: str | None = None) -> Unembedding:
    """The head the lens reads through: ``head`` (a module name) or found on ``model``.

    Found as ``model.get_output_embeddings()`` (Hugging Face models, tied or untied), else a
    module named one of :data:`HEAD_NAMES` with a 2-D ``weight``.

    Raises:
        ValueError: No head found, ``head`` names no such module, or the model is sharded
            (FSDP, ZeRO-3: the head's weight is whole only inside its own forward).
    """
    name = type(model).__name__
    fix = (
        "Pass lens_head='<module name>' (the Linear from the hidden size to the vocabulary that "
        "the model applies after its final norm) and, if lawwatch cannot find the final norm, "
        "final_norm='<module name>'."
    )
    if is_sharded(model):
        raise ValueError(
            f"The logit lens reads the head of {name} outside its forward, where a sharded "
            "model (FSDP, ZeRO-3) holds only a shard of it; measure the lens on an unsharded "
            "copy (lawwatch analyze on a checkpoint) or leave lens=None."
        )
    names = {clean_name(n): m for n, m in model.named_modules()}
    module: nn.Module | None = None
    where = head
    if head is not None:
        module = names.get(head)
        if module is None:
            raise ValueError(f"lens_head={head!r} is not a module of {name}. {fix}")
    else:
        get = getattr(model, "get_output_embeddings", None)
        if callable(get):
            try:
                module = get()
            except (NotImplementedError, AttributeError):
                module = None
            where = "get_output_embeddings()"
        if module is None:
            hits = [n for n in names if n.rsplit(".", 1)[-1] in HEAD_NAMES]
            module, where = (names[hits[0]], hits[0]) if hits else (None, None)
    weight = getattr(module, "weight", None)
    if module is None or not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(
            f"The logit lens needs the unembedding of {name}, and lawwatch found "
            + ("none" if module is None else f"{where!r} without a 2-D weight")
            + f". {fix}"
        )
    config = getattr(base_model(model), "config", None) or getattr(model, "config", None)
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    scaling = getattr(config, "logits_scaling", None)
    if scaling:
        scale /= float(scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return Unembedding(module, str(where), scale, float(softcap) if softcap else None)


def check_head(head: Unembedding, probe: ProbeSet, dim: int | None) -> None:
    """Refuse a lens head that cannot read the residual stream into the probe's token ids.

    Its weight is ``(V, d)``: ``d`` must be the hidden size (when the model states it) and
    ``V`` must cover every token id of the probe (the lens scores the next token among them).

    Raises:
        ValueError: The head's shape, what it should be, and the fix.
    """
    rows, width = head.weight.shape
    fix = (
        "Pass lens_head='<module name>': the Linear from the hidden size to the vocabulary "
        "that the model applies after its final norm, or leave lens=None."
    )
    if dim is not None and width != dim:
        raise ValueError(
            f"The logit lens's head {head.name!r} has a weight of shape {(rows, width)}, which "
            f"does not read a hidden state of width {dim} (it needs ({rows}, {dim})). {fix}"
        )
    top = int(probe.input_ids.max()) if len(probe) > 0 else -1
    if top >= rows:
        raise ValueError(
            f"The logit lens's head {head.name!r} scores {rows} tokens, but the probe holds "
            f"token id {top}. {fix}"
        )
