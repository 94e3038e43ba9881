"""LoRA adapters (PEFT) on SWIRL's policies, with the base model as the KL reference.

Adapters are added *after* SFT, so the frozen base is the SFT model and the reference policy is the
same network with its adapters disabled: no second copy of the weights. One backend gets one named adapter; two
backends that share one language model (``TokenFWM`` + ``TokenIDM.sharing(fwm)``, or Janus-Pro's two paths,
``JanusFWM`` + ``VLMIDM.sharing(fwm)``: the paper's "one base, two LoRA adapters" variant) get two adapters on one
``PeftModel``:

    add_lora(fwm, spec, "fwm")
    add_lora(idm, spec, "idm", share_with=fwm)

Each backend's inner model (``lm`` / ``model``; a ``DiffusionFWM``'s ``unet``) becomes an ``AdapterView``: it
activates the backend's own adapter before every forward and ``generate``, so the FWM's reward and the IDM's policy
can alternate on one base without anyone switching by hand. Which adapter *trains* is set only by
``set_trainable``: switching the active adapter never changes ``requires_grad`` (PEFT's ``set_adapter`` and
``disable_adapter`` do; this module undoes that).

``save_pretrained`` of a LoRA backend writes a plain Hugging Face folder with its adapter merged into the weights
(the format every loader here reads: transformers, or diffusers for a UNet); the adapters themselves live in the
Lightning checkpoint.

A ``DiffusionFWM`` adapts its UNet only: its text encoder is shared by the policy and the reference (adapter
disabled), so it must stay frozen while a phase trains the adapter (``add_lora`` freezes it; SWIRL's SFT, before
the adapter trains, still fine-tunes it with the UNet).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin
from diffusers.utils.constants import SAFETENSORS_WEIGHTS_NAME
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import Tensor, nn

from swirl_vl.models.base import Rollout
from swirl_vl.models.diffusion_fwm import DiffusionFWM
from swirl_vl.models.generation import text_generate
from swirl_vl.models.idm import VLMIDM
from swirl_vl.models.janus import JanusFWM
from swirl_vl.models.token_fwm import TokenFWM
from swirl_vl.models.token_idm import TokenIDM

LLAMA_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
"""A diffusers UNet's attention projections (self- and cross-attention), as diffusers' own LoRA training adapts."""


@dataclass
class LoraSpec:
    """A LoRA adapter's shape (``--model.init_args.lora.r=16`` …)."""

    r: int = 16
    """Rank of the low-rank update ``B A``."""
    alpha: int = 32
    """Scale numerator: the update is ``(alpha / r) B A``."""
    dropout: float = 0.0
    """Dropout on the adapter's input. Keep 0 for GRPO: in train mode it makes sampling and scoring disagree, so
    the ratio is no longer 1 before an update."""
    target_modules: list[str] | str | None = None
    """Linear layers to adapt: module-name suffixes or one regular expression matched against full module names.
    None: the backend's attention projections, Llama-style ``q_proj``… for the language models (in a CLIP-based VLM
    they also match the vision tower's q/k/v), ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` for a diffusion UNet."""

    def to_config(self, default_targets: Sequence[str] = LLAMA_ATTENTION) -> LoraConfig:
        """PEFT's config; ``default_targets`` stand for ``target_modules=None`` (the backend's own)."""
        if self.r < 1:
            raise ValueError(f"lora r={self.r} must be ≥ 1")
        targets = self.target_modules if self.target_modules is not None else default_targets
        targets = targets if isinstance(targets, str) else list(targets)
        # init_lora_weights=True: B = 0, so the adapted model starts equal to the base (the reference).
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets, init_lora_weights=True
        )


class AdapterView(nn.Module):
    """A backend's inner model seen through one named adapter of a (possibly shared) ``PeftModel``.

    Activates ``adapter`` before every forward and ``generate``; other attributes (``config``,
    ``generation_config``, ``device``, ``dtype``…) are the wrapped transformers or diffusers model's.
    """

    def __init__(self, peft_model: PeftModel, adapter: str) -> None:
        super().__init__()
        self.peft = peft_model
        self.adapter = adapter

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.activate()
        return self.peft(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self.activate()
        return text_generate(self.peft.get_base_model())(*args, **kwargs)

    def activate(self) -> None:
        if self.peft.active_adapter != self.adapter:
            with _grads_kept(self.peft):
                self.peft.set_adapter(self.adapter)

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """A plain transformers / diffusers folder: base weights + this adapter's update, merged without touching
        the live model."""
        base = self.peft.get_base_model()
        state = merged_state_dict(self.peft, self.adapter)
        if isinstance(base, ModelMixin):
            # diffusers' save_pretrained has no state_dict argument and would write the LoRA layers' keys: write
            # what it writes (config.json + one safetensors file, which from_pretrained reads) ourselves.
            Path(path).mkdir(parents=True, exist_ok=True)
            base.save_config(path)
            tensors = {k: v.detach().contiguous() for k, v in state.items()}
            save_file(tensors, Path(path) / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
        else:
            base.save_pretrained(path, state_dict=state, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "peft":  # not registered yet (during __init__): avoid recursing
                raise
            return getattr(self.peft.get_base_model(), name)


def add_lora(backend: nn.Module, spec: LoraSpec, adapter: str = "default", share_with: nn.Module | None = None) -> None:
    """Give ``backend`` a fresh LoRA adapter named ``adapter``; freeze the rest; make only the adapter trainable.

    ``share_with``: another backend, already given an adapter, whose inner model ``backend`` shares; the new adapter
    is added to that ``PeftModel`` (the shared-base variant). Call after SFT: the base becomes the KL reference.
    The adapter's name is part of its parameters' state-dict keys: a resumed run adds it, same name, before loading.
    """
    attr = _inner_attr(backend)
    inner = getattr(backend, attr)
    if share_with is None:
        if isinstance(inner, AdapterView) or any(isinstance(m, BaseTunerLayer) for m in inner.modules()):
            raise ValueError(
                f"{type(backend).__name__}.{attr} already holds LoRA layers (shared with another backend?): "
                "pass share_with=<the backend that has them>"
            )
        # The whole backend, not just the adapted model: a DiffusionFWM's text encoder also feeds the reference.
        backend.requires_grad_(False)
        peft_model = get_peft_model(inner, spec.to_config(_default_targets(backend)), adapter_name=adapter)
    else:
        peft_model = _view(share_with).peft
        base = inner.peft.get_base_model() if isinstance(inner, AdapterView) else inner
        if base is not peft_model.get_base_model():
            raise ValueError(f"{type(backend).__name__} does not share its model with {type(share_with).__name__}")
        if adapter in peft_model.peft_config:
            raise ValueError(f"adapter {adapter!r} exists already; give each backend its own name")
        with _grads_kept(peft_model):  # adding an adapter re-runs set_adapter on every layer
            peft_model.add_adapter(adapter, spec.to_config(_default_targets(backend)))
    setattr(backend, attr, AdapterView(peft_model, adapter))
    set_trainable(backend, True)


def set_trainable(backend: nn.Module, on: bool) -> None:
    """Turn gradients of ``backend``'s own adapter on or off; nothing else (base, other adapters) is touched."""
    for p in adapter_parameters(backend):
        p.requires_grad_(on)


def adapter_parameters(backend: nn.Module, adapter: str | None = None) -> list[nn.Parameter]:
    """The parameters of ``adapter`` (default: ``backend``'s own), e.g. for its optimiser."""
    view = _view(backend)
    adapter = adapter or view.adapter
    params: list[nn.Parameter] = []
    for module in view.peft.modules():
        if isinstance(module, BaseTunerLayer):
            for layer_name in module.adapter_layer_names:
                layers = getattr(module, layer_name)  # ModuleDict or ParameterDict keyed by adapter name
                if adapter in layers:
                    entry = layers[adapter]
                    params.extend([entry] if isinstance(entry, nn.Parameter) else entry.parameters())
    return params


def use_adapter(backend: nn.Module, adapter: str) -> None:
    """Make ``adapter`` the active one on ``backend``'s base (``requires_grad`` unchanged).

    ``AdapterView`` routes each backend's calls to its own adapter; this is for calling the ``PeftModel`` directly.
    """
    peft_model = _view(backend).peft
    with _grads_kept(peft_model):
        peft_model.set_adapter(adapter)


@contextmanager
def base_weights(backend: nn.Module) -> Iterator[None]:
    """Run ``backend`` as its base (SFT) model: adapters disabled, no grad, every ``requires_grad`` unchanged."""
    peft_model = _view(backend).peft
    with torch.no_grad(), _grads_kept(peft_model), peft_model.disable_adapter():
        yield


def reference_logprobs(backend: nn.Module, rollout: Rollout) -> tuple[Tensor, Tensor]:
    """``backend.rollout_logprobs(rollout)`` under the base (SFT) weights: ``(N, L)`` log-probs and mask, no grad."""
    with base_weights(backend):
        return backend.rollout_logprobs(rollout)


class LoraReference:
    """Stands in for a frozen reference copy: the policy's scoring methods with its adapters disabled.

    Serves what a policy's objective asks of its reference: ``rollout_logprobs`` (token policies' k3 KL),
    ``transition_means`` (``DiffusionFWM``'s closed-form KL) and ``denoised_x0`` (the forward-process objective).
    Not an ``nn.Module``, so it adds nothing to state dicts or ``parameters()``.
    """

    def __init__(self, policy: nn.Module) -> None:
        _view(policy)  # fail now, not in the first update, if the policy has no adapter
        self.policy = policy

    def rollout_logprobs(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        return reference_logprobs(self.policy, rollout)

    def transition_means(self, rollout: Rollout) -> tuple[Tensor, Tensor, Tensor]:
        """``DiffusionFWM.transition_means`` under the base weights (no grad)."""
        if not isinstance(self.policy, DiffusionFWM):
            raise TypeError(f"{type(self.policy).__name__} has no diffusion transitions")
        with base_weights(self.policy):
            return self.policy.transition_means(rollout)

    def denoised_x0(self, rollout: Rollout, noised: dict[str, Tensor]) -> Tensor:
        """``DiffusionFWM.denoised_x0`` under the base weights (no grad)."""
        if not isinstance(self.policy, DiffusionFWM):
            raise TypeError(f"{type(self.policy).__name__} has no denoiser")
        with base_weights(self.policy):
            return self.policy.denoised_x0(rollout, noised)


def merged_state_dict(peft_model: PeftModel, adapter: str) -> dict[str, Tensor]:
    """The base model's state dict under its original key names, with ``adapter``'s update added to each weight."""
    base = peft_model.get_base_model()
    state = {
        name.replace(".base_layer.", "."): tensor
        for name, tensor in base.state_dict().items()
        if not any(part.startswith("lora_") for part in name.split("."))
    }
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            key = f"{name}.weight"
            state[key] = state[key] + module.get_delta_weight(adapter).to(state[key].dtype)
    return state


def _inner_attr(backend: nn.Module) -> str:
    """Name of the attribute that holds ``backend``'s transformers model (a ``DiffusionFWM``'s diffusers UNet)."""
    if isinstance(backend, (TokenFWM, TokenIDM)):
        return "lm"
    if isinstance(backend, (VLMIDM, JanusFWM)):
        return "model"
    if isinstance(backend, DiffusionFWM):
        return "unet"
    raise NotImplementedError(f"LoRA is not supported for {type(backend).__name__}")


def _default_targets(backend: nn.Module) -> list[str]:
    """The modules ``LoraSpec(target_modules=None)`` adapts on ``backend``."""
    return list(UNET_ATTENTION if isinstance(backend, DiffusionFWM) else LLAMA_ATTENTION)


def _view(backend: nn.Module) -> AdapterView:
    inner = getattr(backend, _inner_attr(backend))
    if not isinstance(inner, AdapterView):
        raise ValueError(f"{type(backend).__name__} has no LoRA adapter: call add_lora first")
    return inner


@contextmanager
def _grads_kept(module: nn.Module) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` on exit: PEFT's adapter switches rewrite them."""
    saved = [(p, p.requires_grad) for p in module.parameters()]
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
