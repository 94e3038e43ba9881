"""Emu3 as a token FWM: read from transformers' Emu3 format, equal to the library's own generation and embedding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sprite_oracles import sft_loss_after, sprite_pairs
from transformers import (
    Emu3ForConditionalGeneration,
    Emu3Processor,
    LogitsProcessorList,
    UnbatchedClassifierFreeGuidanceLogitsProcessor,
)

from swirl_vl.models.emu3 import EMU3_EOL, Emu3FWM, Emu3IDM, build_tiny_emu3, visual_token_name

pytestmark = pytest.mark.usefixtures("one_thread")
ACTIONS = ["move the red square left", "turn the blue circle"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("emu3") / "tiny"
    Emu3FWM(str(path), build_tiny=True, image_size=32)
    return path


@pytest.fixture(scope="module")
def own_vq_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real layout: no vq/, the folder's own Emu3VQVAE tokenises images."""
    return build_tiny_emu3(tmp_path_factory.mktemp("emu3_own") / "tiny", own_vq=True)


@pytest.fixture(scope="module")
def fwm(folder: Path) -> Emu3FWM:
    return Emu3FWM(str(folder), image_size=32).eval()


def _pixel_exact(images: torch.Tensor) -> torch.Tensor:
    """Images on the 8-bit grid, so that the processor's PIL path and a float tensor hold the same pixels."""
    return (images * 255).round() / 255


def test_the_folder_is_emu3s_layout_with_its_image_vocabulary(folder: Path, fwm: Emu3FWM) -> None:
    library = Emu3ForConditionalGeneration.from_pretrained(folder)
    processor = Emu3Processor.from_pretrained(folder)
    assert library.config.architectures == ["Emu3ForConditionalGeneration"]
    assert library.config.vocabulary_map == processor.tokenizer.get_vocab()
    assert type(processor.tokenizer).__name__ == "GPT2Tokenizer"
    # Code k is the token named <|visual token k|>, as the library's own mapping reads the vocabulary.
    mapping = library.model.vocabulary_mapping
    assert fwm.code_token_ids.tolist() == [mapping.img2bpe[k] for k in range(fwm.vq.num_codes)]
    assert processor.tokenizer.convert_ids_to_tokens(fwm.code_token_ids[:2].tolist()) == [
        "<|visual token 000000|>",
        visual_token_name(1),
    ]
    # An image is h rows of w codes, each row ended by <|extra_200|>: 4 × (4 + 1) slots for 16 codes.
    assert fwm.grid == (4, 4) and fwm.num_image_tokens == 16 and fwm.image_length == 20
    assert fwm.image_layout.view(4, 5)[:, -1].eq(mapping.eol_token_id).all()
    assert fwm.image_layout.view(4, 5)[:, :-1].eq(-1).all()
    assert not fwm.vq_in_lm  # the sprite VQ in vq/, not the folder's random Emu3VQVAE


def _library_generate(
    library: Emu3ForConditionalGeneration,
    prompt: list[int],
    height: int,
    width: int,
    guidance: tuple[float, list[int]] | None = None,
) -> list[int]:
    """The library's image generation, greedy: its ``generate`` constrained as transformers' Emu3 example
    constrains it (``prefix_allowed_tokens_fn``: visual tokens within a row, the row-end token at its end), and
    with ``guidance = (scale, negative prompt)`` guided as that example guides (the library's
    ``UnbatchedClassifierFreeGuidanceLogitsProcessor``)."""
    visual = library.model.vocabulary_mapping.image_tokens
    eol = library.model.vocabulary_mapping.eol_token_id
    start = len(prompt)

    def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        offset = input_ids.shape[0] - start + 1  # the example counts from the image's <|image token|>
        return [eol] if offset % (width + 1) == 0 else visual

    processors = []
    if guidance is not None:
        scale, negative = guidance
        processors = [UnbatchedClassifierFreeGuidanceLogitsProcessor(scale, library, torch.tensor([negative]))]
    out = library.generate(
        input_ids=torch.tensor([prompt]),
        max_new_tokens=height * (width + 1),
        do_sample=False,
        prefix_allowed_tokens_fn=allowed,
        logits_processor=LogitsProcessorList(processors),
    )
    return out[0, start:].tolist()


def test_greedy_image_tokens_equal_the_librarys_own_generation(folder: Path, fwm: Emu3FWM) -> None:
    """Token for token, row ends included: each prompt alone through the library's generate; left-padded, with the
    prefill shared, in ours."""
    library = Emu3ForConditionalGeneration.from_pretrained(folder).eval()
    x, _, _ = sprite_pairs(2)
    S = fwm.image_length
    rollout = fwm.sample(x, ACTIONS, greedy=True)
    ours = rollout.context["input_ids"][:, -S:].tolist()
    prompts = fwm._prompt_rows(fwm.image_token_ids(fwm.encode_images(x)).tolist(), ACTIONS)
    for row, prompt in zip(ours, prompts):
        assert row == _library_generate(library, prompt, *fwm.grid)
    assert rollout.old_logprobs.shape == (2, fwm.num_image_tokens)  # the codes are scored, the row ends are not
    # The decoded image is the one the row-end-free codes give.
    codes = fwm.token_to_code[torch.tensor(ours).view(2, 4, 5)[:, :, :4].reshape(2, 16)]
    torch.testing.assert_close(rollout.images, fwm.decode_codes(codes))


def test_guided_greedy_tokens_equal_the_librarys_guided_generation(folder: Path) -> None:
    """Guidance on the logits against the negative prompt equals the library's guidance on log-probs (the two differ
    by a constant per row, which the restriction's softmax removes); guided rollouts re-score as sampled."""
    library = Emu3ForConditionalGeneration.from_pretrained(folder).eval()
    guided = Emu3FWM(str(folder), image_size=32, guidance_scale=3.0, negative_prompt="remove the square").eval()
    x, _, _ = sprite_pairs(2)
    S = guided.image_length
    ours = guided.sample(x, ACTIONS, greedy=True).context["input_ids"][:, -S:].tolist()
    x_tokens = guided.image_token_ids(guided.encode_images(x)).tolist()
    negatives = guided._unconditional_rows(x_tokens)
    for row, prompt, negative in zip(ours, guided._prompt_rows(x_tokens, ACTIONS), negatives):
        assert row == _library_generate(library, prompt, *guided.grid, guidance=(3.0, negative))
    assert (
        ours
        != Emu3FWM(str(folder), image_size=32)
        .eval()
        .sample(x, ACTIONS, greedy=True)
        .context["input_ids"][:, -S:]
        .tolist()
    )  # guidance changed the image
    torch.manual_seed(0)
    rollout = guided.sample(x, ACTIONS, num_samples=2)
    logp, _ = guided.rollout_logprobs(rollout)
    torch.testing.assert_close(logp, rollout.old_logprobs, rtol=1e-4, atol=1e-4)


def test_the_prompt_embeds_x_as_the_librarys_processor_and_model_do(own_vq_folder: Path) -> None:
    """With the folder's own Emu3VQVAE: Emu3Processor's placeholders + pixel values through the library's forward
    give the logits of our prompt, whose x is already the VQ's code tokens with row ends."""
    fwm = Emu3FWM(str(own_vq_folder), image_size=32).eval()
    assert fwm.vq_in_lm and fwm.vq.model is fwm.lm.model.vqmodel
    processor = Emu3Processor.from_pretrained(own_vq_folder)
    x, _, _ = sprite_pairs(1)
    x = _pixel_exact(x)
    image = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    header = f"{processor.image_start_token}4*4{processor.fake_token_around_image}"
    inputs = processor(images=[image], text=[f"{ACTIONS[0]}<image>{header}"], return_tensors="pt")
    ids, _ = fwm.prompt_ids(x, ACTIONS[:1])
    placeholders = inputs["input_ids"] == processor.image_token_id
    assert ids.shape == inputs["input_ids"].shape and placeholders.sum() == fwm.image_length
    assert torch.equal(ids[~placeholders], inputs["input_ids"][~placeholders])
    with torch.no_grad():
        library = fwm.lm(**inputs).logits
        ours = fwm.lm(input_ids=ids).logits
    torch.testing.assert_close(ours, library, rtol=1e-5, atol=1e-5)


def test_log_likelihood_is_the_library_models_mean_code_logprob(folder: Path, fwm: Emu3FWM) -> None:
    library = Emu3ForConditionalGeneration.from_pretrained(folder).eval()
    x, y, _ = sprite_pairs(2)
    S = fwm.image_length
    ours = fwm.log_likelihood(x, ACTIONS, y)
    prompts = fwm._prompt_rows(fwm.image_token_ids(fwm.encode_images(x)).tolist(), ACTIONS)
    codes = fwm.encode_images(y)
    visual = library.model.vocabulary_mapping.image_tokens
    for value, prompt, target in zip(ours, prompts, codes):
        ids = torch.tensor([prompt + fwm.image_token_ids(target[None])[0].tolist()])
        with torch.no_grad():
            logits = library(input_ids=ids).logits[0, -S - 1 : -1, visual]  # visual sorted by id: column k is code k
        code_positions = torch.arange(S).view(4, 5)[:, :4].reshape(-1)
        direct = logits[code_positions].log_softmax(-1).gather(-1, target[:, None]).mean()
        torch.testing.assert_close(value, direct, rtol=1e-5, atol=1e-5)


def test_sft_trains_the_language_model_and_saves_as_the_library_class(folder: Path, tmp_path: Path) -> None:
    fwm = Emu3FWM(str(folder), image_size=32)
    vq = {k: v.clone() for k, v in fwm.lm.model.vqmodel.state_dict().items()}
    x, y, z = sprite_pairs(4)
    first, last = sft_loss_after(fwm, lambda: fwm.sft_loss(x, z, y), steps=20)
    assert last < 0.7 * first
    assert all(torch.equal(v, vq[k]) for k, v in fwm.lm.model.vqmodel.state_dict().items())  # frozen
    fwm.save_pretrained(tmp_path / "saved")
    library = Emu3ForConditionalGeneration.from_pretrained(tmp_path / "saved")
    saved, ours = library.state_dict(), fwm.lm.state_dict()
    assert saved.keys() == ours.keys() and all(torch.equal(saved[k], ours[k]) for k in saved)
    again = Emu3FWM(str(tmp_path / "saved"))
    assert again.image_size == 32 and not again.vq_in_lm
    torch.testing.assert_close(again.log_likelihood(x, z, y), fwm.eval().log_likelihood(x, z, y), rtol=0, atol=0)


def test_a_folder_with_its_own_vq_saves_no_copy_of_it(own_vq_folder: Path, tmp_path: Path) -> None:
    fwm = Emu3FWM(str(own_vq_folder), image_size=32).eval()
    assert not any(p.requires_grad for p in fwm.vq.parameters())
    fwm.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "vq").exists()
    again = Emu3FWM(str(tmp_path / "saved")).eval()
    assert again.vq_in_lm
    x, y, z = sprite_pairs(2)
    torch.testing.assert_close(again.log_likelihood(x, z, y), fwm.log_likelihood(x, z, y), rtol=0, atol=0)


def test_fsdp2_shards_the_language_model_and_keeps_its_own_vq_whole(own_vq_folder: Path, tmp_path: Path) -> None:
    """The image tokenizer is called outside the model's forward: sharded, it would hold DTensors there. One
    process (gloo) is enough to see where each weight lives; scores and greedy images are unchanged."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from swirl_vl.training.fsdp import shard_backend

    fwm = Emu3FWM(str(own_vq_folder), image_size=32).eval()
    x, y, z = sprite_pairs(2)
    before, image = fwm.log_likelihood(x, z, y), fwm.sample(x, z, greedy=True).images
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        shard_backend(fwm, init_device_mesh("cpu", (1,)))
        assert not any(isinstance(p, DTensor) for p in fwm.vq.parameters())
        assert all(isinstance(p, DTensor) for p in fwm.lm.model.text_model.parameters())
        torch.testing.assert_close(fwm.log_likelihood(x, z, y), before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fwm.sample(x, z, greedy=True).images, image)
    finally:
        dist.destroy_process_group()


def test_a_vocabulary_without_the_image_tokens_is_a_clear_error(folder: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    config = json.loads((broken / "config.json").read_text())
    del config["vocabulary_map"][EMU3_EOL]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks some of Emu3's image tokens"):
        Emu3FWM(str(broken), image_size=32)


def test_a_missing_folder_names_the_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="hf download BAAI/Emu3-Gen-hf"):
        Emu3FWM(str(tmp_path / "missing"))
    # The real config stops before loading anything, naming each missing input once.
    from swirl_vl.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", "configs/aurorabench_emu3.yaml"])
    message = str(stop.value.code)
    assert message.count("Emu3 checkpoint not found at 'checkpoints/Emu3-Gen-hf'") == 1, message
    assert message.count("Emu3 checkpoint not found at 'checkpoints/Emu3-Chat-hf'") == 1 and "split 'test'" in message


def test_the_emu3_config_runs_sft_and_both_phases(tmp_path: Path) -> None:
    """``configs/sprites_emu3.yaml`` through the CLI on a tiny schedule; the saved FWM loads in the library."""
    from tests.test_cli import fit_tiny_schedule

    run = fit_tiny_schedule(tmp_path, "sprites_emu3.yaml")
    saved = run / "pretrained" / "iteration_1_phase1" / "fwm"
    assert isinstance(Emu3ForConditionalGeneration.from_pretrained(saved), Emu3ForConditionalGeneration)
    assert Emu3FWM(str(saved)).image_size == 32


def test_the_emu3_idm_scores_its_samples_and_shares_the_world_models_weights(folder: Path) -> None:
    idm = Emu3IDM(str(folder), image_size=32, max_new_tokens=6).eval()
    x, y, z = sprite_pairs(2)
    ids, _ = idm.prompt_ids(x, y)
    # <bos> [x: header, 4 rows of 4 codes + row end, <|extra_201|> <|image end|>] [y: the same]
    fwm = Emu3FWM(str(folder), image_size=32)
    x_tokens, y_tokens = (fwm.image_token_ids(fwm.encode_images(i)) for i in (x, y))
    header = fwm.image_header()
    expected = [fwm.tokenizer.bos_token_id, *header, *x_tokens[0].tolist(), fwm.eof_id, fwm.eoi_id]
    expected += [*header, *y_tokens[0].tolist(), fwm.eof_id, fwm.eoi_id]
    assert ids[0].tolist() == expected
    torch.manual_seed(0)
    rollout = idm.sample(x, y, num_samples=3)
    logp, _ = idm.rollout_logprobs(rollout)
    torch.testing.assert_close(logp[rollout.mask], rollout.old_logprobs[rollout.mask], rtol=1e-4, atol=1e-4)
    answers = rollout.context["input_ids"][:, -rollout.mask.shape[1] :]
    assert (answers[rollout.mask] < min(idm.code_token_ids.tolist())).all()  # actions are text
    first, last = sft_loss_after(idm, lambda: idm.sft_loss(x, y, z), steps=10)
    assert last < 0.7 * first
    shared = Emu3IDM.sharing(fwm)
    assert shared.lm is fwm.lm
    with pytest.raises(TypeError, match="Emu3FWM"):
        Emu3IDM.sharing(object())
