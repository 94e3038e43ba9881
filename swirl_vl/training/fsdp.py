"""FSDP2 (PyTorch's ``fully_shard``) for ``SwirlModule``, through Lightning's ``ModelParallelStrategy``.

``--trainer.strategy swirl_vl.training.fsdp.FSDP2Strategy``: every process holds 1/N of each model's weights,
gradients and AdamW state (ZeRO-3). ``SwirlModule.configure_model`` shards, per model, each transformer or UNet block
(the classes its library names in ``_no_split_modules``) and then the library model that holds them (a
``PreTrainedModel`` or diffusers ``ModelMixin``, whose forward is what the backends call), so a model's forward
gathers its weights block by block and frees them after. What a backend keeps outside those models (a frozen VQ,
say) stays whole on every process, and so does a frozen library model the backend also calls on its own from
inside a sharded one (Emu3's VQ); a trainable parameter outside them is refused, since nothing would average its
gradient.

Under sharding every forward pass is a collective, so every process must make as many: generation decodes until
the last process has finished (``synced_gpus``), and a process whose step has nothing to learn from still runs its
policy forward (``SwirlModule._idle_loss``). A full-fine-tuning KL reference cannot be a ``deepcopy`` of a sharded
model: it is copied before sharding and sharded alike, and ``refresh_reference`` copies the policy's shards into it.

Works on CPU with gloo (the 2-process test), and on GPUs with NCCL.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin
from lightning.fabric.strategies.model_parallel import _load_raw_module_state, _rekey_optimizer_state_if_needed
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.utils.stateless import _reparametrize_module
from transformers import PreTrainedModel
from typing_extensions import override

from swirl_vl.models.generation import is_sharded

LIBRARY_MODELS = (PreTrainedModel, ModelMixin)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as plain FSDP2: one data-parallel dimension over every process, no
    tensor parallelism, and checkpoints gathered into one file on rank 0 (as the other strategies write them)."""

    def __init__(self, save_distributed_checkpoint: bool = False, **kwargs: Any) -> None:
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    @override
    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_processes * self.num_nodes
        self._tensor_parallel_size = 1
        super().setup_environment()

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loader for a whole-tensor checkpoint file, except that the module first completes its state
        dict (``SwirlModule.complete_state_dict``: the KL references, which checkpoints leave out). Lightning's own
        loads the weights into the shards before any module hook runs, and so refuses such a checkpoint."""
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():  # a distributed checkpoint folder (save_distributed_checkpoint=True)
            return super().load_checkpoint(path, weights_only=weights_only)
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        module = self.lightning_module
        if hasattr(module, "complete_state_dict"):
            module.complete_state_dict(checkpoint)
        strict = module.strict_loading
        _load_raw_module_state(checkpoint.pop("state_dict"), self.model, strict=strict)
        # Not strict: a parameter that never had a gradient (LLaVA's unused vision post-norm) has no AdamW state, as it
        # would have none without the resume.
        options = StateDictOptions(broadcast_from_rank0=True, full_state_dict=True, strict=False)
        if self.optimizers:  # fit (test and predict make none)
            for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
                state = _rekey_optimizer_state_if_needed(state, self.model)
                set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state, options=options)
        return checkpoint  # the rest (loops, callbacks) as Lightning's loader leaves it


def library_models(backend: nn.Module) -> list[nn.Module]:
    """The outermost ``PreTrainedModel`` / ``ModelMixin`` modules inside ``backend`` (or ``backend`` itself)."""
    if isinstance(backend, LIBRARY_MODELS):
        return [backend]
    found: list[nn.Module] = []
    for child in backend.children():
        found += library_models(child)
    return found


def shard_backend(backend: nn.Module, mesh: DeviceMesh, select: list[bool] | None = None) -> list[bool]:
    """``fully_shard`` each block, then each library model of ``backend`` that holds trainable weights, or those
    ``select`` picks (a KL reference: the ones of the policy it copies); returns which library models were sharded.

    Raises when a trainable parameter would be left outside every unit (its gradient would not be averaged).
    """
    models = library_models(backend)
    if select is None:
        select = [any(p.requires_grad for p in model.parameters()) for model in models]
    # Frozen library models (a VQ, a text encoder) stay whole on every process, as their own methods call them, even
    # one that also sits inside a sharded model (Emu3's VQ, the image tokenizer, is a part of its language model).
    whole = {p for model, chosen in zip(models, select, strict=True) if not chosen for p in model.parameters()}
    for model, chosen in zip(models, select, strict=True):
        if not chosen:
            continue
        blocks = set()
        for module in model.modules():
            blocks |= set(getattr(module, "_no_split_modules", None) or ())
        for module in reversed(list(model.modules())):  # inner blocks first (a UNet's up block holds res blocks)
            if type(module).__name__ in blocks and not all(p in whole for p in module.parameters()):
                fully_shard(module, mesh=mesh, ignored_params=whole or None)
        fully_shard(model, mesh=mesh, ignored_params=whole or None)
        # FSDP2 takes the first unit to run forward for its root. transformers' generate calls parts of a model (its
        # image features) outside its forward, so a fit whose first pass is generation (resumed in Phase I, or no
        # SFT) would make a block a root: settle the root now.
        model._get_fsdp_state()._lazy_init()
    sharded = {id(p) for m in backend.modules() if isinstance(m, FSDPModule) for p in m.parameters()}
    loose = [name for name, p in backend.named_parameters() if p.requires_grad and id(p) not in sharded]
    if loose:
        raise ValueError(
            f"FSDP2: {type(backend).__name__} trains parameters outside its library models, which nothing would "
            f"average across processes: {loose[:5]}"
        )
    return select


def reshard(module: nn.Module) -> None:
    """Free the gathered weights FSDP2 keeps after a forward without backward (a frozen model's, a reference's,
    generation's): the outermost unit of each model keeps its own weights gathered until a backward pass."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@torch.no_grad()
def copy_shards(source: nn.Module, target: nn.Module) -> None:
    """Copy ``source``'s weights into ``target``, a copy of it made before both were sharded alike: each process
    copies its own shards (no communication)."""
    reshard(source)
    reshard(target)
    for (name, a), (other, b) in zip(source.state_dict().items(), target.state_dict().items(), strict=True):
        if name != other:
            raise ValueError(f"{type(target).__name__} is not a copy of {type(source).__name__}: {name} ≠ {other}")
        local = a.to_local() if isinstance(a, DTensor) else a
        (b.to_local() if isinstance(b, DTensor) else b).copy_(local)


@contextlib.contextmanager
def full_weights(backend: nn.Module) -> Iterator[None]:
    """Within: ``backend`` holds its whole weights on rank 0 (for ``save_pretrained``), when it is sharded; a
    collective, so every process must enter it. Not sharded: nothing changes."""
    if not is_sharded(backend):
        yield
        return
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(backend, options=options)  # only rank 0 gets the gathered tensors
    if not state:
        yield
        return
    with _reparametrize_module(backend, state, tie_weights=True):
        yield


if "fsdp2" not in StrategyRegistry:  # --trainer.strategy fsdp2
    StrategyRegistry.register("fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard) over every process")
