"""LoRA on SWIRL's policies: trainable set, base-as-reference identities, merged save, state dicts, shared base."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser
from torch import nn

from swirl_vl.models.base import Rollout
from swirl_vl.models.idm import VLMIDM
from swirl_vl.models.token_fwm import TokenFWM
from swirl_vl.models.token_idm import TokenIDM
from swirl_vl.training.lora import (
    LoraReference,
    LoraSpec,
    adapter_parameters,
    add_lora,
    reference_logprobs,
    set_trainable,
    use_adapter,
)
from tests.sprite_oracles import sprite_pairs

SPEC = LoraSpec(r=4, alpha=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    TokenFWM(str(root / "token"), build_tiny=True)
    VLMIDM(str(root / "llava"), build_tiny="llava")
    return {"token_fwm": root / "token", "token_idm": root / "token", "vlm_idm": root / "llava"}


LOADERS: dict[str, Callable[[Path], nn.Module]] = {
    "token_fwm": TokenFWM.from_pretrained,
    "token_idm": TokenIDM.from_pretrained,
    "vlm_idm": VLMIDM.from_pretrained,
}


def _load(kind: str, folders: dict[str, Path]) -> nn.Module:
    torch.manual_seed(0)
    return LOADERS[kind](folders[kind]).eval()


def _rollout(backend: nn.Module) -> Rollout:
    x, y, z = sprite_pairs(2)
    torch.manual_seed(1)
    if isinstance(backend, TokenFWM):
        return backend.sample(x, z, num_samples=2)
    return backend.sample(x, y, num_samples=2, max_new_tokens=6)


def _adapter_step(backend: nn.Module, rollout: Rollout, lr: float = 1e-2) -> None:
    """One optimiser step on the adapter that raises the rollout's log-probs."""
    opt = torch.optim.Adam(adapter_parameters(backend), lr=lr)
    logp, mask = backend.rollout_logprobs(rollout)
    (-logp.masked_fill(~mask, 0).sum()).backward()
    opt.step()


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_only_adapter_weights_train(kind: str, folders: dict[str, Path]) -> None:
    backend = _load(kind, folders)
    add_lora(backend, SPEC, "policy")
    trainable = {n for n, p in backend.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.policy." in n or ".lora_B.policy." in n for n in trainable), trainable
    assert {id(p) for p in adapter_parameters(backend)} == {id(p) for p in backend.parameters() if p.requires_grad}
    set_trainable(backend, False)
    assert not any(p.requires_grad for p in backend.parameters())
    with pytest.raises(ValueError, match="share_with"):
        add_lora(backend, SPEC, "again")


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_base_is_the_reference(kind: str, folders: dict[str, Path]) -> None:
    backend = _load(kind, folders)
    rollout = _rollout(backend)
    with torch.no_grad():
        sft, _ = backend.rollout_logprobs(rollout)
    add_lora(backend, SPEC, "policy")
    adapted, mask = backend.rollout_logprobs(rollout)
    reference, ref_mask = reference_logprobs(backend, rollout)
    assert torch.equal(adapted, sft) and torch.equal(reference, sft), "B = 0: the adapter starts as the base"
    assert torch.equal(ref_mask, mask) and not reference.requires_grad

    _adapter_step(backend, rollout)
    with torch.no_grad():
        adapted, _ = backend.rollout_logprobs(rollout)
    reference, _ = LoraReference(backend).rollout_logprobs(rollout)
    assert (adapted - sft)[mask].abs().max() > 1e-3, "the step moved the policy"
    assert torch.equal(reference, sft), "disabling the adapter gives the SFT model back"
    fresh = _rollout(backend)  # generate() runs through the adapter too: the GRPO ratio is 1 before an update
    torch.testing.assert_close(backend.rollout_logprobs(fresh)[0], fresh.old_logprobs, rtol=0, atol=1e-5)
    # PEFT re-enables adapters with set_adapter, which would switch grads on; reference_logprobs keeps them.
    assert all(p.requires_grad for p in adapter_parameters(backend))
    set_trainable(backend, False)
    reference_logprobs(backend, rollout)
    assert not any(p.requires_grad for p in adapter_parameters(backend))


@pytest.mark.parametrize("kind", ["token_fwm", "vlm_idm"])
def test_save_writes_a_plain_merged_folder(kind: str, folders: dict[str, Path], tmp_path: Path) -> None:
    backend = _load(kind, folders)
    rollout = _rollout(backend)
    with torch.no_grad():
        sft, _ = backend.rollout_logprobs(rollout)
    add_lora(backend, SPEC, "policy")
    _adapter_step(backend, rollout)
    backend.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    loaded = LOADERS[kind](tmp_path / "merged").eval()
    with torch.no_grad():
        adapted, mask = backend.rollout_logprobs(rollout)
        merged, _ = loaded.rollout_logprobs(rollout)
    assert (adapted - sft)[mask].abs().max() > 1e-3
    torch.testing.assert_close(merged[mask], adapted[mask], rtol=0, atol=1e-4)
    # Saving merged a copy: the live base, hence the reference, is untouched.
    assert torch.equal(reference_logprobs(backend, rollout)[0], sft)


def test_state_dict_round_trip_for_resume(folders: dict[str, Path]) -> None:
    backend = _load("token_fwm", folders)
    rollout = _rollout(backend)
    add_lora(backend, SPEC, "fwm")
    _adapter_step(backend, rollout)
    resumed = _load("token_fwm", folders)
    add_lora(resumed, SPEC, "fwm")  # a resumed run adds the adapter before loading the checkpoint
    resumed.load_state_dict(backend.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(resumed.rollout_logprobs(rollout)[0], backend.rollout_logprobs(rollout)[0])


def test_two_adapters_on_one_shared_base(folders: dict[str, Path]) -> None:
    fwm = _load("token_fwm", folders)
    idm = TokenIDM.sharing(fwm).eval()
    x, y, z = sprite_pairs(2)
    fwm_rollout, idm_rollout = _rollout(fwm), _rollout(idm)
    with torch.no_grad():
        fwm_sft, idm_sft = fwm.rollout_logprobs(fwm_rollout)[0], idm.rollout_logprobs(idm_rollout)[0]
    add_lora(fwm, SPEC, "fwm")
    add_lora(idm, SPEC, "idm", share_with=fwm)
    assert fwm.lm.peft is idm.lm.peft and sorted(fwm.lm.peft.peft_config) == ["fwm", "idm"]
    base_params = {id(p) for n, p in fwm.named_parameters() if "lora_" not in n}
    assert base_params == {id(p) for n, p in idm.named_parameters() if "lora_" not in n}, "one base"

    # Phase I: the FWM trains while the frozen IDM labels and rewards; calls alternate between the two adapters.
    set_trainable(fwm, True)
    set_trainable(idm, False)
    idm.sample(x, y, greedy=True, max_new_tokens=6)
    _adapter_step(fwm, fwm_rollout, lr=5e-2)
    idm.log_likelihood(x, y, z)
    assert all(p.requires_grad for p in adapter_parameters(fwm))
    assert not any(p.requires_grad for p in adapter_parameters(idm)), "the inactive adapter stays frozen"
    with torch.no_grad():
        assert (fwm.rollout_logprobs(fwm_rollout)[0] - fwm_sft).abs().max() > 1e-3
        assert torch.equal(idm.rollout_logprobs(idm_rollout)[0], idm_sft), "the IDM's adapter did not move"
    assert torch.equal(reference_logprobs(fwm, fwm_rollout)[0], fwm_sft)

    # Phase II: the other way round, after switching the active adapter by hand as well.
    set_trainable(fwm, False)
    set_trainable(idm, True)
    use_adapter(fwm, "fwm")
    fwm.log_likelihood(x, z, y)
    _adapter_step(idm, idm_rollout, lr=5e-2)
    assert not any(p.requires_grad for p in adapter_parameters(fwm))
    assert all(p.requires_grad for p in adapter_parameters(idm))
    with torch.no_grad():
        assert (idm.rollout_logprobs(idm_rollout)[0] - idm_sft)[idm_rollout.mask].abs().max() > 1e-3
    assert torch.equal(reference_logprobs(idm, idm_rollout)[0], idm_sft)
    assert not any(p.requires_grad for p in adapter_parameters(fwm))


def test_shared_adapter_needs_the_same_base(folders: dict[str, Path]) -> None:
    fwm, other = _load("token_fwm", folders), _load("token_idm", folders)
    add_lora(fwm, SPEC, "fwm")
    with pytest.raises(ValueError, match="does not share"):
        add_lora(other, SPEC, "idm", share_with=fwm)
    with pytest.raises(ValueError, match="exists already"):
        add_lora(TokenIDM.sharing(fwm), SPEC, "fwm", share_with=fwm)


def test_unsupported_backends_say_so(folders: dict[str, Path]) -> None:
    with pytest.raises(NotImplementedError, match="Linear"):
        add_lora(nn.Linear(2, 2), SPEC)
    backend = _load("token_fwm", folders)
    with pytest.raises(ValueError, match="add_lora first"):
        reference_logprobs(backend, _rollout(backend))


def test_spec_is_a_cli_argument() -> None:
    parser = ArgumentParser()
    parser.add_argument("--lora", type=LoraSpec)
    cfg = parser.parse_args(["--lora.r=4", "--lora.target_modules=[q_proj, v_proj]"])
    spec = parser.instantiate_classes(cfg).lora
    assert spec == LoraSpec(r=4, target_modules=["q_proj", "v_proj"])
    config = spec.to_config()
    assert config.r == 4 and config.lora_alpha == 32 and set(config.target_modules) == {"q_proj", "v_proj"}
    # No targets given: the backend's defaults (Llama attention here; add_lora passes a UNet's own).
    assert set(LoraSpec().to_config().target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert "--lora.alpha" in parser.format_help()
