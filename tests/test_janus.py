"""Janus-Pro as the world model, from its published layout: a tiny folder read by transformers' own Janus classes,
the FWM's image loop against ``JanusForConditionalGeneration.generate`` itself, and the IDM through ``VLMIDM``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import JanusForConditionalGeneration, JanusProcessor

from swirl_vl.models.generation import left_pad_positions
from swirl_vl.models.idm import VLMIDM
from swirl_vl.models.janus import JanusFWM, build_tiny_janus
from tests.sprite_oracles import sprite_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_janus(tmp_path_factory.mktemp("janus") / "tiny", seed=0)


@pytest.fixture(scope="module")
def fwm(folder: Path) -> JanusFWM:
    return JanusFWM(str(folder)).eval()


def _text_prompts(fwm: JanusFWM, texts: list[str]) -> dict[str, torch.Tensor]:
    """Janus's own text-to-image inputs: its chat template, then its processor in image mode."""
    turns = [[{"role": "user", "content": [{"type": "text", "text": t}]}] for t in texts]
    chats = [fwm.processor.apply_chat_template(t, add_generation_prompt=True) for t in turns]
    return fwm.processor(text=chats, generation_mode="image", return_tensors="pt")


def test_the_tiny_folder_is_janus_layout_read_by_its_own_classes(folder: Path) -> None:
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= names
    assert json.loads((folder / "config.json").read_text())["model_type"] == "janus"
    model = JanusForConditionalGeneration.from_pretrained(folder)
    processor = JanusProcessor.from_pretrained(folder)
    assert (processor.image_token, processor.image_start_token) == ("<image_placeholder>", "<begin_of_image>")
    assert model.model.vqmodel.config.num_embeddings == 64 and processor.num_image_tokens == 16
    assert sum(p.stat().st_size for p in folder.iterdir()) < 8e6


@pytest.mark.parametrize(
    ("mode", "top_k"), [("greedy", None), ("sampled", None), ("sampled", 12)], ids=["greedy", "sampled", "top-k-12"]
)
def test_the_image_loop_equals_januss_own_generate_token_for_token(fwm: JanusFWM, mode: str, top_k: int | None) -> None:
    # Janus's generate always runs guidance (it doubles the batch); equal-length prompts, so no padding differs.
    # Its top_k is transformers' default 50 unless given: 0 turns it off.
    inputs = _text_prompts(fwm, ["move the red square left", "move the blue circle left"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert mask.all()
    sampled = mode == "sampled"
    fwm.guidance_scale = 3.0
    try:
        for seed in range(3 if sampled else 1):
            torch.manual_seed(seed)
            theirs = fwm.model.generate(
                **inputs, generation_mode="image", do_sample=sampled, guidance_scale=3.0, top_k=top_k or 0
            )
            torch.manual_seed(seed)
            unconditional = fwm.embed(fwm.unconditional_ids(ids))
            ours, logprobs = fwm.generate_codes(
                fwm.embed(ids), mask, greedy=not sampled, top_k=top_k, unconditional=unconditional
            )
            assert theirs.shape == ours.shape == (2, 16)
            assert torch.equal(ours, theirs), (seed, ours, theirs)
            assert ours.unique().numel() > 2  # not a degenerate constant image
            assert logprobs.shape == (2, 16) and (logprobs <= 0).all()
    finally:
        fwm.guidance_scale = 1.0


def test_x_sits_where_janus_puts_images_and_the_prompt_is_its_chat_format(fwm: JanusFWM) -> None:
    x, _, z = sprite_pairs(2, seed=1)
    assert fwm.prompts(["move the red square left"]) == [
        "<|User|>: <image_placeholder>\nmove the red square left\n\n<|Assistant|>:<begin_of_image>"
    ]
    inputs = fwm.prompt_inputs(x, z)
    ids = inputs["input_ids"]
    assert (ids == fwm.image_token_id).sum(1).tolist() == [16, 16]  # the processor's placeholders, one per feature
    with torch.no_grad():
        own = fwm.model.model(**inputs).last_hidden_state  # JanusModel places the SigLIP features itself
        prompt, mask, _ = fwm.prompt_embeds(x, z)
        mine = fwm.model.model.language_model(
            inputs_embeds=prompt, attention_mask=mask, position_ids=left_pad_positions(mask)
        ).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(mine[real], own[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_rollouts_are_scored_as_they_were_sampled(fwm: JanusFWM, guidance: float) -> None:
    x, y, z = sprite_pairs(2, seed=2)
    fwm.guidance_scale = guidance
    try:
        torch.manual_seed(0)
        rollout = fwm.sample(x, z, num_samples=4, temperature=0.9, top_k=20)
        logp, mask = fwm.rollout_logprobs(rollout)
    finally:
        fwm.guidance_scale = 1.0
    assert rollout.images.shape == (8, 3, 32, 32) and mask.all()
    torch.testing.assert_close(logp, rollout.old_logprobs, rtol=0, atol=1e-4)
    decoded = ((fwm.model.model.vqmodel.decode(rollout.context["codes"]) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(rollout.images, decoded)
    greedy = fwm.sample(x, z, greedy=True)
    # The greedy codes are the argmax at every step: no code has a higher log-prob than the one it took.
    assert (greedy.old_logprobs > -torch.log(torch.tensor(64.0))).all()
    scored = fwm.log_likelihood(x, z, y)
    prompt, pmask, _ = fwm.prompt_embeds(x, z)
    direct = fwm.code_logits(prompt, pmask, fwm.encode_images(y)).log_softmax(-1)
    torch.testing.assert_close(scored, direct.gather(-1, fwm.encode_images(y)[..., None]).squeeze(-1).mean(-1))


def test_sft_trains_the_transformer_and_never_the_vq(folder: Path, tmp_path: Path) -> None:
    fwm = JanusFWM(str(folder)).train()
    x, y, z = sprite_pairs(4, seed=3)
    opt = torch.optim.AdamW([p for p in fwm.parameters() if p.requires_grad], lr=3e-3)
    vq_before = {k: v.clone() for k, v in fwm.model.model.vqmodel.state_dict().items()}
    losses = []
    for _ in range(12):
        loss = fwm.sft_loss(x, z, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.equal(v, fwm.model.model.vqmodel.state_dict()[k]) for k, v in vq_before.items())
    fwm.save_pretrained(tmp_path / "saved")
    reloaded = JanusFWM(str(tmp_path / "saved"))
    fwm.eval()
    torch.testing.assert_close(reloaded.log_likelihood(x, z, y), fwm.log_likelihood(x, z, y), rtol=0, atol=0)
    # With every example dropped, SFT trains the unconditional prompt guidance subtracts.
    fwm.unconditional_dropout, fwm.guidance_scale = 1.0, 2.0
    fwm.train()
    with torch.no_grad():
        dropped = fwm.sft_loss(x, z, y)
        _, mask, plain = fwm.prompt_embeds(x, z)
        unconditional = -fwm.code_logprobs(plain, mask, fwm.encode_images(y)).mean()
    torch.testing.assert_close(dropped, unconditional)


def test_the_idm_reads_a_janus_folder_through_its_understanding_path(folder: Path) -> None:
    idm = VLMIDM(str(folder))
    assert isinstance(idm.model, JanusForConditionalGeneration)
    x, y, z = sprite_pairs(2, seed=4)
    torch.manual_seed(0)
    rollout = idm.sample(x, y, num_samples=3)  # Janus's generate keeps the recording processor (text mode)
    logp, mask = idm.rollout_logprobs(rollout)
    assert mask.any(1).all()
    torch.testing.assert_close(logp * mask, rollout.old_logprobs * mask, rtol=0, atol=1e-4)
    assert idm.log_likelihood(x, y, z).shape == (2,)


def test_a_missing_folder_names_the_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="deepseek-community/Janus-Pro-7B"):
        JanusFWM(str(tmp_path / "nothing"))
    assert JanusFWM.preflight({"path": str(tmp_path / "nothing")}, "fit")
    assert JanusFWM.preflight({"path": str(tmp_path / "nothing"), "build_tiny": True}, "fit") == []


def test_one_janus_model_serves_both_roles_through_two_adapters(folder: Path) -> None:
    """The paper's shared-weights variant on a real unified model: the generation path (FWM) and the understanding
    path (IDM) of one Janus, each with its own LoRA adapter; training one moves only its own policy."""
    from swirl_vl.training.lora import LoraSpec, adapter_parameters, add_lora, reference_logprobs, set_trainable

    fwm = JanusFWM(str(folder)).eval()
    idm = VLMIDM.sharing(fwm, max_new_tokens=6, prompt="Which action?")
    assert idm.model is fwm.model and idm.processor is fwm.processor
    x, y, z = sprite_pairs(2, seed=5)
    torch.manual_seed(0)
    fwm_rollout, idm_rollout = fwm.sample(x, z, num_samples=2), idm.sample(x, y, num_samples=2)
    with torch.no_grad():
        fwm_sft, idm_sft = fwm.rollout_logprobs(fwm_rollout)[0], idm.rollout_logprobs(idm_rollout)[0]
    spec = LoraSpec(r=4)
    add_lora(fwm, spec, "fwm")
    add_lora(idm, spec, "idm", share_with=fwm)
    assert fwm.model.peft is idm.model.peft and sorted(fwm.model.peft.peft_config) == ["fwm", "idm"]
    set_trainable(fwm, True)
    set_trainable(idm, False)
    opt = torch.optim.SGD(adapter_parameters(fwm), lr=0.5)
    for _ in range(3):  # Phase I-style steps, the IDM's adapter running in between
        idm.log_likelihood(x, y, z)
        loss = -fwm.rollout_logprobs(fwm_rollout)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert (fwm.rollout_logprobs(fwm_rollout)[0] - fwm_sft).abs().max() > 1e-3, "the FWM's adapter trained"
        torch.testing.assert_close(idm.rollout_logprobs(idm_rollout)[0], idm_sft, rtol=0, atol=1e-6)
    torch.testing.assert_close(reference_logprobs(fwm, fwm_rollout)[0], fwm_sft, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in adapter_parameters(idm))


def test_the_janus_config_runs_sft_and_both_phases_on_one_model_with_two_adapters(tmp_path: Path) -> None:
    """``configs/sprites_janus.yaml`` through the CLI on a tiny schedule, one Janus in both roles (``shared_base``,
    ``lora``); the saved world model and IDM load as ``JanusForConditionalGeneration``."""
    from tests.test_cli import fit_tiny_schedule

    run = fit_tiny_schedule(
        tmp_path,
        "sprites_janus.yaml",
        *("--model.init_args.shared_base", "true", "--model.init_args.lora.r", "4"),
        *("--model.init_args.sft_fwm_steps", "null"),  # one base: both train on every SFT step
        *("--model.init_args.idm.init_args.model.init_args.path", str(tmp_path / "models" / "fwm")),
        phase2_steps=2,
    )
    saved = run / "pretrained"
    for model in ("iteration_1_phase1/fwm", "iteration_1_phase2/idm"):
        assert isinstance(JanusForConditionalGeneration.from_pretrained(saved / model), JanusForConditionalGeneration)
    assert JanusFWM(str(saved / "iteration_1_phase1" / "fwm")).image_size == 32
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    for adapter in ("fwm", "idm"):
        lora_b = [v for k, v in state.items() if k.endswith(f"lora_B.{adapter}.weight")]
        assert lora_b and any(v.abs().sum() > 0 for v in lora_b), f"the {adapter} adapter did not train"
    # One base: each of its tensors is the same storage under the FWM's and the IDM's names (saved once).
    base = [k for k in state if k.startswith("fwm.model.") and "lora_" not in k and "language_model" in k]
    assert base and all(state[k].data_ptr() == state["idm." + k[len("fwm.") :]].data_ptr() for k in base)


def test_the_real_janus_config_stops_before_loading_naming_the_download(tmp_path: Path, monkeypatch) -> None:
    from swirl_vl.cli import main

    monkeypatch.chdir(tmp_path)  # the config's relative paths exist nowhere here
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", "configs/aurorabench_janus.yaml"])
    message = str(stop.value.code)
    assert "missing inputs, nothing was run" in message
    assert message.count("hf download deepseek-community/Janus-Pro-7B --local-dir PATH") == 1, message
    assert "JanusFWM checkpoint not found at 'checkpoints/Janus-Pro-7B'" in message and "split 'test'" in message
    assert sorted(tmp_path.iterdir()) == []


def test_shared_base_names_what_cannot_share(folder: Path) -> None:
    from swirl_vl.training import FWMModule, IDMModule, SwirlModule
    from swirl_vl.training.lora import LoraSpec
    from tests.sprite_oracles import OracleFWM

    idm = IDMModule(VLMIDM(str(folder)))
    with pytest.raises(ValueError, match="VLMIDM shares a JanusFWM's model, not a OracleFWM"):
        SwirlModule(FWMModule(OracleFWM()), idm, shared_base=True, lora=LoraSpec(r=4))
    with pytest.raises(ValueError, match="needs --model.init_args.lora .* got lora=None"):
        SwirlModule(FWMModule(JanusFWM(str(folder))), idm, shared_base=True)
