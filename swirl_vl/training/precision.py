"""A frozen model kept in low precision for scoring, its full-precision weights and optimiser state parked in CPU
memory until it trains again (``SwirlModule(frozen_dtype=...)``).

In an RL phase one model trains and the other only scores (Phase I's reward ``log Q_φ(z|x,ŷ)``, Phase II's
``log P_θ(y|x,z)``). Parking makes a ``dtype`` copy of the frozen model's floating-point parameters on their device
(2 bytes each in bfloat16 instead of 4), moves their float32 data to CPU memory and frees it on the device, and
moves the optimiser moments (8 more bytes per trained parameter) to CPU memory too. The frozen model scores through
its copy (``scoring``: the copy swapped in for the call, under ``torch.autocast``); unparking puts the float32 data
back exactly.

The parameters themselves keep their dtype, device and identity throughout: optimisers, state dicts and DDP's
gradient hooks keep referring to them (changing a parameter's dtype would silently drop DDP's hooks, so its
gradients would no longer be averaged across ranks). On a CPU device there is no other memory to park in: the
float32 data stays where it is and only the copy is added.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Parked:
    """A parked model: its scoring copy, each freed parameter's float32 data (CPU), and its optimiser state."""

    model: nn.Module
    dtype: torch.dtype
    copy: dict[str, Tensor] = field(default_factory=dict)
    masters: dict[nn.Parameter, Tensor] = field(default_factory=dict)
    optimizer_state: dict[nn.Parameter, dict] = field(default_factory=dict)


def _to(state: dict, device: torch.device | str) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in state.items()}


def _owns_storage(p: Tensor) -> bool:
    """Whether ``p`` is all of a storage that can be freed (so freeing it frees only ``p``; not a file mapping)."""
    storage = p.untyped_storage()
    return p.storage_offset() == 0 and storage.nbytes() == p.numel() * p.element_size() and storage.resizable()


def park(
    model: nn.Module,
    dtype: torch.dtype,
    optimizer: torch.optim.Optimizer | None,
    keep_state: bool,
    free: bool | None = None,
) -> Parked:
    """Give ``model`` a ``dtype`` scoring copy and park its float32 data and optimiser state in CPU memory.

    ``optimizer``'s state for its parameters goes to CPU memory (``keep_state``) or is dropped (when it would be
    cleared before their next training phase anyway). ``free``: free each parameter's device storage after copying
    it to CPU memory (default: when the parameters are not in CPU memory already).
    """
    parked = Parked(model, dtype)
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        parked.copy[name] = p.detach().to(dtype)
        if (p.device.type != "cpu" if free is None else free) and _owns_storage(p):
            parked.masters[p] = p.detach().to("cpu", copy=True)
            p.untyped_storage().resize_(0)
        if optimizer is not None and p in optimizer.state:
            state = optimizer.state.pop(p)
            if keep_state:
                parked.optimizer_state[p] = _to(state, "cpu")
    return parked


@torch.no_grad()
def unpark(parked: Parked, optimizer: torch.optim.Optimizer | None) -> None:
    """Put the float32 data (and optimiser state) back on each parameter's device, exactly as parked."""
    for p, master in parked.masters.items():
        p.untyped_storage().resize_(master.numel() * master.element_size())
        p.copy_(master)
    for p, state in parked.optimizer_state.items():
        if optimizer is not None:
            optimizer.state[p] = _to(state, p.device)
    parked.masters.clear()
    parked.optimizer_state.clear()
    parked.copy.clear()


def scoring(parked: Parked | None, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a model runs in: its scoring copy under autocast while parked, else nothing."""
    if parked is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(_reparametrize_module(parked.model, parked.copy, tie_weights=True))
    stack.enter_context(torch.autocast(device.type, dtype=parked.dtype))
    return stack


def master_state(parked: Parked, names: dict[nn.Parameter, list[str]]) -> dict[str, Tensor]:
    """``{state-dict key: float32 data}`` of every freed parameter, under each of its names (tied weights)."""
    return {name: master for p, master in parked.masters.items() for name in names.get(p, [])}
