"""Chameleon / Anole as a token FWM: read from transformers' Chameleon format, equal to the library's own model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sprite_oracles import sft_loss_after, sprite_pairs
from transformers import AutoTokenizer, ChameleonForConditionalGeneration

from swirl_vl.models.chameleon import CHAMELEON_BOI, CHAMELEON_EOI, ChameleonFWM, image_token_name

pytestmark = pytest.mark.usefixtures("one_thread")
ACTIONS = ["move the red square left", "turn the blue circle"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chameleon") / "tiny"
    ChameleonFWM(str(path), build_tiny=True, image_size=32)
    return path


@pytest.fixture(scope="module")
def fwm(folder: Path) -> ChameleonFWM:
    return ChameleonFWM(str(folder), image_size=32).eval()


def test_the_folder_is_chameleons_layout_with_its_image_vocabulary(folder: Path, fwm: ChameleonFWM) -> None:
    library = ChameleonForConditionalGeneration.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert library.config.architectures == ["ChameleonForConditionalGeneration"]
    assert library.config.vocabulary_map == tokenizer.get_vocab()
    # Code k is the token named IMGIMG…Z for k, as the library's own mapping reads the vocabulary.
    mapping = library.model.vocabulary_mapping
    assert fwm.code_token_ids.tolist() == [mapping.img2bpe[k] for k in range(fwm.vq.num_codes)]
    assert tokenizer.convert_ids_to_tokens(fwm.code_token_ids[:3].tolist()) == [image_token_name(k) for k in range(3)]
    assert image_token_name(1207) == "IMGIMGBCAHZ"
    assert (fwm.boi_id, fwm.eoi_id) == tuple(tokenizer.convert_tokens_to_ids([CHAMELEON_BOI, CHAMELEON_EOI]))
    # Why the FWM holds ChameleonImageGeneration: the library's forward sets every image-token logit to the minimum.
    ids = torch.tensor([[tokenizer.bos_token_id, fwm.boi_id]])
    logits = library(input_ids=ids).logits
    assert (logits[0, -1, mapping.image_tokens] == torch.finfo(logits.dtype).min).all()


def _library_greedy(library: ChameleonForConditionalGeneration, prompt: list[int], length: int) -> list[int]:
    """Greedy decoding on the library's own modules, uncached: its hidden states and head, argmax over its image
    tokens (the logits before its forward masks them)."""
    image_tokens = torch.tensor(library.model.vocabulary_mapping.image_tokens)
    ids = torch.tensor([prompt])
    for _ in range(length):
        hidden = library.model(input_ids=ids).last_hidden_state[:, -1]
        logits = library.lm_head(hidden)[0, image_tokens]
        ids = torch.cat([ids, image_tokens[logits.argmax()].view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist()


def test_greedy_image_tokens_equal_the_librarys_own_model(folder: Path, fwm: ChameleonFWM) -> None:
    """Token for token: each prompt alone and uncached on the library's model; left-padded and cached in ours."""
    library = ChameleonForConditionalGeneration.from_pretrained(folder).eval()
    x, _, _ = sprite_pairs(2)
    L = fwm.num_image_tokens
    ours = fwm.sample(x, ACTIONS, greedy=True).context["input_ids"][:, -L:].tolist()
    codes = fwm.encode_images(x)
    for row, prompt in zip(ours, fwm._prompt_rows([[int(t) for t in fwm.code_token_ids[c]] for c in codes], ACTIONS)):
        assert row == _library_greedy(library, prompt, L)
    # The prompt is <s> action <racm3:break> x <eoss> <racm3:break>.
    first = fwm._prompt_rows([fwm.code_token_ids[codes[0]].tolist()], ACTIONS[:1])[0]
    assert first[0] == fwm.tokenizer.bos_token_id and first[-1] == fwm.boi_id
    assert first[-L - 3] == fwm.boi_id and first[-2] == fwm.eoi_id


def test_log_likelihood_is_the_library_models_mean_code_logprob(folder: Path, fwm: ChameleonFWM) -> None:
    library = ChameleonForConditionalGeneration.from_pretrained(folder).eval()
    x, y, _ = sprite_pairs(2)
    L = fwm.num_image_tokens
    ours = fwm.log_likelihood(x, ACTIONS, y)
    prompts = fwm._prompt_rows([fwm.code_token_ids[c].tolist() for c in fwm.encode_images(x)], ACTIONS)
    codes = fwm.encode_images(y)
    for value, prompt, target in zip(ours, prompts, codes):
        ids = torch.tensor([prompt + fwm.code_token_ids[target].tolist()])
        with torch.no_grad():
            hidden = library.model(input_ids=ids).last_hidden_state[0, -L - 1 : -1]
            logits = library.lm_head(hidden)[:, library.model.vocabulary_mapping.image_tokens]
        # image_tokens is sorted by id, and so are the codes' ids here: column k is code k.
        direct = logits.log_softmax(-1).gather(-1, target[:, None]).mean()
        torch.testing.assert_close(value, direct, rtol=1e-5, atol=1e-5)


def test_sft_trains_the_language_model_and_saves_as_the_library_class(folder: Path, tmp_path: Path) -> None:
    fwm = ChameleonFWM(str(folder), image_size=32)
    encoder = {k: v.clone() for k, v in fwm.lm.model.vqmodel.state_dict().items()}
    x, y, z = sprite_pairs(4)
    first, last = sft_loss_after(fwm, lambda: fwm.sft_loss(x, z, y), steps=10)
    assert last < 0.7 * first
    # The folder's own VQGAN encoder is frozen (codes come from the image tokenizer in vq/).
    assert all(torch.equal(v, encoder[k]) for k, v in fwm.lm.model.vqmodel.state_dict().items())
    fwm.save_pretrained(tmp_path / "saved")
    library = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert library.config.architectures == ["ChameleonForConditionalGeneration"]
    saved, ours = library.state_dict(), fwm.lm.state_dict()
    assert saved.keys() == ours.keys() and all(torch.equal(saved[k], ours[k]) for k in saved)
    again = ChameleonFWM(str(tmp_path / "saved"))
    assert again.image_size == 32
    torch.testing.assert_close(again.log_likelihood(x, z, y), fwm.eval().log_likelihood(x, z, y), rtol=0, atol=0)


def test_the_chameleon_config_runs_sft_and_both_phases(tmp_path: Path) -> None:
    """``configs/sprites_chameleon.yaml`` through the CLI on a tiny schedule; the saved FWM loads in the library."""
    from tests.test_cli import fit_tiny_schedule

    run = fit_tiny_schedule(tmp_path, "sprites_chameleon.yaml")
    saved = run / "pretrained" / "iteration_1_phase1" / "fwm"
    assert isinstance(ChameleonForConditionalGeneration.from_pretrained(saved), ChameleonForConditionalGeneration)
    assert ChameleonFWM(str(saved)).image_size == 32


def test_the_chameleon_idm_scores_its_samples_and_shares_the_world_models_weights(folder: Path) -> None:
    from swirl_vl.models.chameleon import ChameleonIDM

    idm = ChameleonIDM(str(folder), image_size=32, max_new_tokens=6).eval()
    x, y, _ = sprite_pairs(2)
    torch.manual_seed(0)
    rollout = idm.sample(x, y, num_samples=3)
    logp, _ = idm.rollout_logprobs(rollout)
    torch.testing.assert_close(logp[rollout.mask], rollout.old_logprobs[rollout.mask], rtol=1e-4, atol=1e-4)
    # The prompt holds both images between Chameleon's image brackets; actions are text, never image tokens.
    answers = rollout.context["input_ids"][:, -rollout.mask.shape[1] :]
    assert (answers[rollout.mask] < min(idm.code_token_ids.tolist())).all()
    fwm = ChameleonFWM(str(folder), image_size=32)
    shared = ChameleonIDM.sharing(fwm)
    assert shared.lm is fwm.lm
    with pytest.raises(TypeError, match="ChameleonFWM"):
        ChameleonIDM.sharing(object())
