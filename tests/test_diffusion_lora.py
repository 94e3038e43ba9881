"""LoRA on DiffusionFWM's UNet: attention targets, base-as-reference closed-form KL, plain diffusers merged save."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from torch.testing import assert_close

from swirl_vl.models.base import Rollout
from swirl_vl.models.diffusion_fwm import DiffusionFWM
from swirl_vl.models.tiny_diffusion import build_tiny_instruct_pix2pix
from swirl_vl.models.token_idm import TokenIDM
from swirl_vl.training.lora import (
    UNET_ATTENTION,
    AdapterView,
    LoraReference,
    LoraSpec,
    adapter_parameters,
    add_lora,
    base_weights,
)
from swirl_vl.training.sft import FWMModule, IDMModule
from swirl_vl.training.swirl import SwirlModule
from tests.sprite_oracles import sprite_pairs

SPEC = LoraSpec(r=4, alpha=8)
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_instruct_pix2pix(tmp_path_factory.mktemp("diffusion_lora") / "fwm", seed=0)


def _load(path: Path) -> DiffusionFWM:
    # Guidance off: one UNet pass per step keeps the tests fast; the guided path scores the same way.
    return DiffusionFWM(str(path), num_inference_steps=4, guidance_scale=1.0, image_guidance_scale=1.0).eval()


def _rollout(fwm: DiffusionFWM) -> Rollout:
    x, _, z = sprite_pairs(2)
    return fwm.sample(x, z, num_samples=2, generator=torch.Generator().manual_seed(1))


def _perturb(fwm: DiffusionFWM) -> None:
    """Move the adapter off zero (B ≠ 0), as training would."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in fwm.unet.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def test_unet_attention_is_adapted_and_only_the_adapter_trains(folder: Path) -> None:
    fwm = _load(folder)
    add_lora(fwm, SPEC, "fwm")
    assert isinstance(fwm.unet, AdapterView)
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in fwm.unet.named_parameters() if ".lora_A." in n}
    assert adapted and all(n.endswith(tuple(f".{t}" for t in UNET_ATTENTION)) for n in adapted), adapted
    assert {n.rsplit(".", 1)[-1] for n in adapted} >= {"to_q", "to_k", "to_v", "0"}
    trainable = {id(p) for p in fwm.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(fwm)}, "text encoder and UNet base frozen"
    # What DiffusionFWM reads off its UNet still comes from the diffusers model.
    assert fwm.unet.dtype == torch.float32 and fwm.device.type == "cpu" and fwm.unet.config.in_channels == 6


def test_base_is_the_reference_and_only_the_adapter_gets_grads(folder: Path) -> None:
    fwm = _load(folder)
    rollout = _rollout(fwm)
    mask = rollout.mask
    with torch.no_grad():
        base_mean, base_std, _ = fwm.transition_means(rollout)
        base_logp = fwm.policy_scores(rollout).logp
    add_lora(fwm, SPEC, "fwm")
    reference = LoraReference(fwm)
    scores = fwm.policy_scores(rollout, reference)
    assert torch.equal(scores.logp, base_logp), "B = 0: the adapter starts as the base"
    assert scores.kl is not None and torch.equal(scores.kl, torch.zeros_like(scores.kl))

    _perturb(fwm)
    scores = fwm.policy_scores(rollout, reference)
    assert scores.kl is not None and (scores.kl[mask] > 0).all() and (scores.kl[~mask] == 0).all()
    assert (scores.logp - base_logp)[mask].abs().max() > 1e-3, "the adapter moved the policy"
    ref_mean, ref_std, _ = reference.transition_means(rollout)
    assert torch.equal(ref_mean, base_mean) and torch.equal(ref_std, base_std) and not ref_mean.requires_grad
    assert torch.equal(reference.rollout_logprobs(rollout)[0], base_logp)

    scores.logp.sum().backward()
    adapters = {id(p) for p in adapter_parameters(fwm)}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_parameters(fwm))
    assert all(p.grad is None for p in fwm.parameters() if id(p) not in adapters), "base and text encoder untouched"
    assert all(p.requires_grad for p in adapter_parameters(fwm)), "disabling the adapter kept its grads on"
    # Sampling runs through the adapter too: the GRPO ratio is 1 before an update.
    fresh = _rollout(fwm)
    with torch.no_grad():
        assert_close(fwm.policy_scores(fresh).logp, fresh.old_logprobs)


def test_merged_save_is_a_plain_diffusers_unet(folder: Path, tmp_path: Path) -> None:
    fwm = _load(folder)
    rollout = _rollout(fwm)
    with torch.no_grad():
        base_mean, _, _ = fwm.transition_means(rollout)
    add_lora(fwm, SPEC, "fwm")
    _perturb(fwm)
    fwm.save_pretrained(tmp_path / "merged")
    unet_dir = tmp_path / "merged" / "unet"
    assert (unet_dir / "config.json").is_file() and not (unet_dir / "adapter_config.json").exists()
    assert load_file(unet_dir / UNET_WEIGHTS).keys() == load_file(folder / "unet" / UNET_WEIGHTS).keys()

    plain = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    gen = torch.Generator().manual_seed(3)
    sample, context = torch.randn(2, 6, 32, 32, generator=gen), torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([50, 700])
    with torch.no_grad():
        adapted = fwm.unet(sample, t, encoder_hidden_states=context).sample
        merged = plain(sample, t, encoder_hidden_states=context).sample
    with base_weights(fwm):
        base = fwm.unet(sample, t, encoder_hidden_states=context).sample
    assert (adapted - base).abs().max() > 1e-3, "the merged weights carry the adapter's update"
    assert_close(merged, adapted, rtol=0, atol=1e-5)

    loaded = _load(tmp_path / "merged")  # the whole folder loads as a DiffusionFWM as well
    with torch.no_grad():
        assert_close(loaded.transition_means(rollout)[0], fwm.transition_means(rollout)[0], rtol=0, atol=1e-5)
    # Saving merged a copy: the live model keeps its adapter, and its base (the reference) is unchanged.
    assert isinstance(fwm.unet, AdapterView)
    assert torch.equal(LoraReference(fwm).transition_means(rollout)[0], base_mean)


def test_swirl_module_with_lora_and_a_diffusion_fwm(folder: Path, tmp_path: Path) -> None:
    fwm = _load(folder)
    idm = TokenIDM(str(tmp_path / "token"), build_tiny=True)
    module = SwirlModule(FWMModule(fwm, log_images=0), IDMModule(idm, log_images=0), lora=SPEC)
    assert isinstance(fwm.unet, AdapterView)
    sft = {id(p) for p in module.stage_parameters("sft")}
    assert {id(p) for p in fwm.text_encoder.parameters()} <= sft, "SFT still fine-tunes the text encoder"
    assert not sft & {id(p) for p in adapter_parameters(fwm)}, "the adapter waits for Phase I"

    module.enter_stage("phase1", iteration=0, refresh_reference=True)
    assert isinstance(module.fwm_ref, LoraReference)
    assert {id(p) for p in module.stage_parameters("phase1")} == {id(p) for p in adapter_parameters(fwm)}
    trainable = {id(p) for p in fwm.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(fwm)}, "the text encoder is frozen with the base"
    scores = fwm.policy_scores(_rollout(fwm), module.fwm_ref)
    assert scores.kl is not None and torch.equal(scores.kl, torch.zeros_like(scores.kl))
