"""What GRPO needs from the policies and the loop: log-probs of the sampled policy, fresh optimiser state per phase."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sprite_oracles import sprite_pairs

from swirl_vl.models.base import Rollout, check_sampling_settings
from swirl_vl.models.diffusion_fwm import DiffusionFWM
from swirl_vl.models.idm import VLMIDM
from swirl_vl.models.tiny_diffusion import build_tiny_instruct_pix2pix
from swirl_vl.models.token_fwm import TokenFWM
from swirl_vl.training import FWMModule, IDMModule, SwirlModule
from swirl_vl.training.precision import park, scoring, unpark

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rl")
    VLMIDM(str(root / "llava"), build_tiny="llava")
    TokenFWM(str(root / "token"), build_tiny=True)
    build_tiny_instruct_pix2pix(root / "diffusion")
    return {"llava": root / "llava", "token": root / "token", "diffusion": root / "diffusion"}


def test_sampled_token_frequencies_match_exp_logp_at_the_sampling_temperature(folders: dict[str, Path]) -> None:
    idm = VLMIDM.from_pretrained(folders["llava"]).eval()
    x, y, _ = sprite_pairs(1)
    n, temperature = 1000, 0.4
    torch.manual_seed(0)
    # One token per sample, no truncation (top_k = the vocabulary): the sampler's law is softmax(logits / T).
    rollout = idm.sample(x, y, num_samples=n, temperature=temperature, top_k=0, max_new_tokens=1)
    first = rollout.context["input_ids"][:, -1].tolist()
    counts = Counter(first)
    token_prob = {t: float(rollout.old_logprobs[i, 0].exp()) for i, t in enumerate(first)}
    assert rollout.temperature == temperature
    for token, count in counts.most_common(3):
        p = token_prob[token]
        assert abs(count / n - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3, (token, count / n, p)
    # At temperature 1 the same tokens would be scored as far less likely: the check can fail.
    top = counts.most_common(1)[0][0]
    rescored = idm._completion_logprobs(rollout.context, 1, 1.0)[first.index(top), 0].exp().item()
    assert abs(counts[top] / n - rescored) > 10 * (rescored / n) ** 0.5
    # rollout_logprobs scores at the rollout's temperature: the GRPO ratio is 1 before an update.
    logp, _ = idm.rollout_logprobs(rollout)
    torch.testing.assert_close(logp, rollout.old_logprobs)


def test_token_fwm_scores_rollouts_at_their_temperature(folders: dict[str, Path]) -> None:
    fwm = TokenFWM.from_pretrained(folders["token"]).eval()
    x, _, z = sprite_pairs(2)
    torch.manual_seed(0)
    rollout = fwm.sample(x, z, num_samples=2, temperature=0.5, top_p=1.0)
    assert rollout.temperature == 0.5
    logp, _ = fwm.rollout_logprobs(rollout)
    torch.testing.assert_close(logp, rollout.old_logprobs)
    at_one = fwm.code_logprobs(rollout.context["input_ids"], rollout.context["attention_mask"])
    ids, mask = rollout.context["input_ids"], rollout.context["attention_mask"]
    logits = fwm.lm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    direct = torch.log_softmax(logits[:, -fwm.num_image_tokens - 1 : -1, fwm.code_token_ids] / 0.5, dim=-1)
    codes = fwm.token_to_code[rollout.context["input_ids"][:, -fwm.num_image_tokens :]]
    torch.testing.assert_close(logp, direct.gather(-1, codes[..., None]).squeeze(-1), rtol=1e-4, atol=1e-4)
    assert (logp - at_one).abs().max() > 1e-3


def _module(folders: dict[str, Path], **kwargs) -> tuple[SwirlModule, list[torch.optim.Optimizer]]:
    torch.manual_seed(0)
    fwm = FWMModule(DiffusionFWM(str(folders["diffusion"]), num_inference_steps=3))
    idm = IDMModule(VLMIDM.from_pretrained(folders["llava"]))
    module = SwirlModule(fwm, idm, fwm_group_size=2, idm_group_size=2, **kwargs)
    optimizers = module.configure_optimizers()
    module._trainer = SimpleNamespace(optimizers=optimizers)  # what reset_optimizer_state reads of a Trainer
    return module, optimizers


def _sft_step(module: SwirlModule, optimizers: list[torch.optim.Optimizer]) -> None:
    x, y, z = sprite_pairs(2)
    (module.fwm.model.sft_loss(x, z, y) + module.idm.model.sft_loss(x, y, z)).backward()
    for opt in optimizers:
        opt.step()


@pytest.mark.parametrize("fresh", [True, False])
def test_each_rl_phase_starts_with_fresh_optimiser_state(folders: dict[str, Path], fresh: bool) -> None:
    module, (fwm_opt, idm_opt) = _module(folders, fresh_rl_optimizer=fresh)
    module.enter_stage("sft", 0, refresh_reference=True, num_steps=1, starting=True)
    _sft_step(module, [fwm_opt, idm_opt])
    assert len(fwm_opt.state) > 0 and len(idm_opt.state) > 0

    module.enter_stage("phase1", 0, refresh_reference=True, num_steps=1, starting=True)
    assert (len(fwm_opt.state) == 0) is fresh  # the training model's moments and step count start afresh
    assert len(idm_opt.state) > 0  # the frozen model's are left for its own phase
    assert all(p.grad is None for p in module.idm.model.parameters())  # and it holds no stale gradient
    if fresh:
        x, _, z = sprite_pairs(2)
        fwm_opt.zero_grad()
        module.fwm.model.sft_loss(x, z, x).backward()
        fwm_opt.step()
        beta1 = fwm_opt.param_groups[0]["betas"][0]
        p = next(p for p in module.fwm.model.parameters() if p.grad is not None)
        torch.testing.assert_close(fwm_opt.state[p]["exp_avg"], (1 - beta1) * p.grad)
        assert float(fwm_opt.state[p]["step"]) == 1

    # Resuming into the middle of a phase keeps the optimiser state the checkpoint restored.
    module.enter_stage("phase2", 0, refresh_reference=True, num_steps=1, starting=False)
    assert len(idm_opt.state) > 0


def test_phase2_rewards_are_clamped_at_the_reward_floor(folders: dict[str, Path], monkeypatch) -> None:
    module, (_, idm_opt) = _module(folders, reward_floor=-3.0, log_rollouts_every_n_steps=0)
    module.enter_stage("phase2", 0, refresh_reference=True, num_steps=1, starting=True)
    monkeypatch.setattr(module.fwm.model, "log_likelihood", lambda x, z, y, group_size: torch.full((len(z),), -50.0))
    seen = {}
    monkeypatch.setattr(
        module, "update", lambda objective, policy, ref, chunks, *rest: seen.update(r=torch.cat([r for _, r in chunks]))
    )
    x, y, _ = sprite_pairs(2)
    module.phase2_idm_step({"x": x, "y": y}, idm_opt)
    assert seen["r"].shape == (4,) and (seen["r"] == -3.0).all()


def test_an_sft_reference_is_written_once_beside_the_checkpoints_not_in_them(
    folders: dict[str, Path], tmp_path
) -> None:
    module, _ = _module(folders)
    module._trainer = SimpleNamespace(
        optimizers=[], checkpoint_callback=SimpleNamespace(dirpath=str(tmp_path)), global_rank=0
    )
    module.enter_stage("phase1", 0, refresh_reference=True, num_steps=1, starting=True)
    with torch.no_grad():  # the policy moves away from its reference
        for p in module.fwm.model.parameters():
            p.add_(0.01)
    checkpoint = {"state_dict": module.state_dict()}
    full = set(checkpoint["state_dict"])
    module.on_save_checkpoint(checkpoint)
    assert (
        not any(k.startswith("fwm_ref.") for k in checkpoint["state_dict"])
        and (tmp_path / "reference_fwm.pt").is_file()
    )
    assert set(checkpoint["swirl_reference_files"]) == {"fwm"}

    resumed, _ = _module(folders)  # a fresh process: no reference until the checkpoint brings it
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"])  # strict: every key, the reference's from its file
    assert set(checkpoint["state_dict"]) == full
    for (name, ref), (_, loaded) in zip(module.fwm_ref.state_dict().items(), resumed.fwm_ref.state_dict().items()):
        assert torch.equal(ref, loaded), name
    assert not torch.equal(next(resumed.fwm_ref.parameters()), next(resumed.fwm.model.parameters()))

    (tmp_path / "reference_fwm.pt").unlink()
    with pytest.raises(FileNotFoundError, match="reference_fwm.pt"):
        _module(folders)[0].on_load_checkpoint(
            {"state_dict": {}, "swirl_reference_files": checkpoint["swirl_reference_files"]}
        )


def test_nonfinite_steps_are_skipped_and_counted_and_a_run_of_them_stops_fit(
    folders: dict[str, Path], monkeypatch
) -> None:
    module, opts = _module(folders, grad_clip=0.0, max_nonfinite_steps=3)
    logged: list[tuple[str, float]] = []
    monkeypatch.setattr(
        module,
        "log",
        lambda name, value, **_: logged.append(
            (name, float(value.detach() if isinstance(value, torch.Tensor) else value))
        ),
    )
    monkeypatch.setattr(module, "manual_backward", lambda loss: loss.backward())
    module._trainer = SimpleNamespace(optimizers=opts, global_step=0)
    module.enter_stage("sft", 0, refresh_reference=True, num_steps=10, starting=True)
    x, y, z = sprite_pairs(2)
    bad = {"x": x.clone().index_fill_(0, torch.tensor([0]), float("nan")), "y": y, "action": z}
    before = [p.detach().clone() for p in module.parameters()]
    module.sft_step(bad, *opts)  # a NaN image: no step, nothing turned into NaN
    assert all(torch.equal(a, p) for a, p in zip(before, module.parameters()))
    assert ("sft/nonfinite_steps", 1.0) in logged and module._nonfinite_in_row == 1
    module.sft_step({"x": x, "y": y, "action": z}, *opts)  # a finite step trains and ends the run
    assert module._nonfinite_in_row == 0 and not all(torch.equal(a, p) for a, p in zip(before, module.parameters()))
    assert all(torch.isfinite(p).all() for p in module.parameters())
    module.sft_step(bad, *opts)
    module.sft_step(bad, *opts)
    with pytest.raises(RuntimeError, match="3 steps in a row in sft"):
        module.sft_step(bad, *opts)

    # A state-only pair with a NaN image leaves the RL batch before sampling, counted.
    module.enter_stage("phase2", 0, refresh_reference=False, num_steps=1, starting=False)
    pairs = module._rl_pairs({"unlabelled": {"x": bad["x"], "y": y}})
    assert torch.equal(pairs["x"], x[1:]) and ("phase2/nonfinite_pairs", 1.0) in logged and module._step_chunks == 1


def test_sampling_settings_a_backend_does_not_take_fail_before_training(folders: dict[str, Path]) -> None:
    idm = VLMIDM.from_pretrained(folders["llava"])
    flag = "--model.init_args.idm_generation"
    with pytest.raises(ValueError, match="VLMIDM samples with max_new_tokens, temperature, top_k; it takes no 'top_p'"):
        check_sampling_settings(idm, {"top_p": 0.9}, flag)
    with pytest.raises(ValueError, match="temperature must be a number"):
        check_sampling_settings(idm, {"temperature": "hot"}, flag)
    check_sampling_settings(idm, {"temperature": 1.5, "top_k": 10}, flag)
    with pytest.raises(ValueError, match="it takes no 'top_p'"):  # the module checks its settings when it is made
        _module(folders, idm_generation={"top_p": 0.9})


def test_micro_batches_add_up_to_the_whole_step_and_later_updates_reuse_the_first_logprobs(
    folders: dict[str, Path], monkeypatch
) -> None:
    """One rollout batch updated in one piece and in micro-batches of one group gives the same gradient; with two
    updates per rollout batch, the second one's ratio is taken against the first one's log-probs (clipped where it
    moved far enough)."""
    torch.manual_seed(0)
    fwm = FWMModule(TokenFWM(str(folders["token"])))
    idm = IDMModule(VLMIDM.from_pretrained(folders["llava"]))
    module = SwirlModule(fwm, idm, fwm_group_size=2, grad_clip=0.0, updates_per_rollout=2)
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **_: logged.__setitem__(name, float(value)))
    monkeypatch.setattr(module, "manual_backward", lambda loss: loss.backward())
    opt = torch.optim.SGD(fwm.model.parameters(), lr=5.0)  # a large step: the second update's ratio moves
    module._trainer = SimpleNamespace(optimizers=[opt], global_step=0, global_rank=0)
    x, _, z = sprite_pairs(2)
    with torch.no_grad():
        rollout = fwm.model.sample(x, z, num_samples=2)
    rewards = torch.tensor([1.0, -1.0, 0.5, -0.5])

    def rows(r: slice) -> Rollout:
        ctx = {k: v[r] for k, v in rollout.context.items()}
        return Rollout(2, rollout.old_logprobs[r], rollout.mask[r], rollout.images[r], context=ctx, temperature=0.75)

    steps: list[list[torch.Tensor]] = []
    start = [p.detach().clone() for p in fwm.model.parameters()]

    def record_and_step() -> None:
        steps.append([p.grad.clone() for p in fwm.model.parameters() if p.grad is not None])
        torch.optim.SGD.step(opt)

    monkeypatch.setattr(opt, "step", record_and_step)
    results = []
    for chunks in ([(rollout, rewards)], [(rows(slice(0, 2)), rewards[:2]), (rows(slice(2, 4)), rewards[2:])]):
        with torch.no_grad():
            for p, p0 in zip(fwm.model.parameters(), start):
                p.copy_(p0)
        steps.clear()
        module.update(module.fwm_objective, fwm.model, None, chunks, opt, 0.0, "phase1")
        assert len(steps) == 2  # two updates, one optimiser step each
        results.append((list(steps), dict(logged)))
    for whole, pieces in zip(results[0][0][0], results[1][0][0]):
        torch.testing.assert_close(whole, pieces, atol=1e-6, rtol=1e-4)
    assert results[0][1]["phase1/sampler_logprob_gap"] < 1e-4
    assert results[0][1]["phase1/clip_frac"] > 0  # measured on the second update, against the first's log-probs
    torch.testing.assert_close(
        torch.tensor(results[0][1]["phase1/clip_frac"]), torch.tensor(results[1][1]["phase1/clip_frac"])
    )


def test_log_images_0_logs_no_outputs_from_the_swirl_module(folders: dict[str, Path], monkeypatch) -> None:
    module, _ = _module(folders)
    module.fwm.log_images = module.idm.log_images = 0
    for name in ("fwm", "idm"):
        monkeypatch.setattr(
            getattr(module, name), "log_outputs", lambda *_: pytest.fail("outputs logged with log_images 0")
        )
    monkeypatch.setattr(module, "log", lambda *_, **__: None)
    module._trainer = SimpleNamespace(global_step=0)
    x, y, z = sprite_pairs(2)
    module._eval_step({"x": x, "y": y, "action": z, "task": ["a", "b"]}, 0, "val")


@pytest.mark.parametrize("fresh", [False, True])
def test_a_parked_frozen_model_scores_in_bfloat16_and_trains_again_on_its_exact_float32_weights(
    folders: dict[str, Path], fresh: bool
) -> None:
    module, (fwm_opt, idm_opt) = _module(folders, frozen_dtype="bfloat16", fresh_rl_optimizer=fresh)
    module._trainer.checkpoint_callback = None  # what on_save_checkpoint reads of a Trainer
    module.enter_stage("sft", 0, refresh_reference=True, num_steps=1, starting=True)
    _sft_step(module, [fwm_opt, idm_opt])
    idm = module.idm.model
    before = {n: p.detach().clone() for n, p in idm.named_parameters()}
    first = next(p for p in idm.parameters() if p in idm_opt.state)
    moments = {k: v.clone() for k, v in idm_opt.state[first].items()}
    x, y, z = sprite_pairs(4)
    full = idm.log_likelihood(x, y, z)

    module.enter_stage("phase1", 0, refresh_reference=True, num_steps=1, starting=True)
    assert not any(p in idm_opt.state for p in idm.parameters())  # its moments left the device (or were dropped)
    with module.scoring("idm"):
        assert {p.dtype for p in idm.parameters() if p.is_floating_point()} == {torch.bfloat16}
        low = idm.log_likelihood(x, y, z).float()
    assert 0 < (low - full).abs().max() < 0.1, (low, full)  # a bfloat16 score: close, not equal
    with module.scoring("fwm"):  # the training model is not parked: it runs as it trains
        assert {p.dtype for p in module.fwm.model.parameters() if p.is_floating_point()} == {torch.float32}
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    for name, value in before.items():  # a checkpoint holds the weights it will train on, not the scoring copy
        assert torch.equal(checkpoint["state_dict"][f"idm.model.{name}"], value), name

    module.enter_stage("phase2", 0, refresh_reference=True, num_steps=1, starting=True)
    for name, p in idm.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[name]), name
    if fresh:  # its phase starts from empty state: parking dropped it rather than carry it
        assert len(idm_opt.state) == 0
    else:
        assert all(torch.equal(idm_opt.state[first][k], v) for k, v in moments.items())
    with module.scoring("fwm"):
        assert torch.isfinite(module.fwm.model.log_likelihood(x, z, y)).all()
    module.leave_stage()
    assert module.scoring("fwm").__class__.__name__ == "nullcontext"


def test_parking_on_a_gpu_frees_the_float32_storage_and_puts_it_back_exactly(folders: dict[str, Path]) -> None:
    """The device path (``free``), run on CPU: the float32 data goes to a CPU copy and its storage is freed."""
    idm = VLMIDM.from_pretrained(folders["llava"]).eval()
    for p in idm.parameters():  # in memory of its own, as on a device (not the folder's file mapping)
        p.data = p.data.clone()
    opt = torch.optim.AdamW(idm.parameters())
    x, y, z = sprite_pairs(2)
    idm.sft_loss(x, y, z).backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in idm.named_parameters()}
    state = {k: v.clone() for k, v in opt.state[next(iter(idm.parameters()))].items()}
    full = idm.log_likelihood(x, y, z)
    parked = park(idm, torch.bfloat16, opt, keep_state=True, free=True)
    freed = [p for p in idm.parameters() if p.untyped_storage().nbytes() == 0]
    assert len(freed) == len(parked.masters) > 0.9 * len(before)  # all but views into a shared storage
    assert not opt.state
    with scoring(parked, torch.device("cpu")):
        low = idm.log_likelihood(x, y, z).float()
    assert 0 < (low - full).abs().max() < 0.1
    unpark(parked, opt)
    for name, p in idm.named_parameters():
        assert torch.equal(p, before[name]), name
    for k, v in state.items():
        assert torch.equal(opt.state[next(iter(idm.parameters()))][k], v)


def test_the_memory_plan_counts_the_parked_copy_and_the_dropped_moments(folders: dict[str, Path]) -> None:
    from swirl_vl.training.memory import memory_plan

    plain, _ = _module(folders)
    parked, _ = _module(folders, frozen_dtype="bfloat16")
    before, after = memory_plan(plain, 0, 4), memory_plan(parked, 0, 4)
    for stage, frozen in (("phase1", parked.idm.model), ("phase2", parked.fwm.model)):
        floats = [p for p in frozen.parameters() if p.is_floating_point()]
        trained = [p for p in floats if p.requires_grad]
        # On a CPU device: a bfloat16 copy (2 bytes a parameter) is added, AdamW's two float32 moments are dropped.
        change = sum(2 * p.numel() for p in floats) - sum(8 * p.numel() for p in trained)
        assert after.stages[stage] - before.stages[stage] == change, stage
    assert after.stages["sft"] == before.stages["sft"]
