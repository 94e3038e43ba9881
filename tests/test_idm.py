"""VLMIDM on both tiny architectures: loading, scoring identities, sampling layout, learning, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessorList

from swirl_vl.models import idm as idm_module
from swirl_vl.models.generation import RecordLogprobs, generate_groups
from swirl_vl.models.idm import VLMIDM, _extend, selective_log_softmax

ARCHITECTURES = {"llava": "LlavaForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
ACTIONS = [
    "move the red circle left",
    "paint the blue square yellow",
    "remove the green triangle",
    "add a red square at row 2 column 3",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine every parallel op waits for a
    descheduled thread (measured: a Qwen SFT step of 4 pairs took 8.7 s with 2 threads, 0.1 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def tiny_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model folder per architecture, built once through VLMIDM's build-if-missing path."""
    path = tmp_path_factory.mktemp(request.param) / "idm"
    VLMIDM(str(path), build_tiny=request.param)
    return path


@pytest.fixture
def idm(tiny_path: Path) -> VLMIDM:
    torch.manual_seed(0)
    return VLMIDM.from_pretrained(tiny_path)


@pytest.fixture
def pairs() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 32, 32, generator=g), torch.rand(4, 3, 32, 32, generator=g), list(ACTIONS)


def test_folder_loads_with_plain_auto_classes(tiny_path: Path) -> None:
    config = json.loads((tiny_path / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[config["model_type"]]]
    model = AutoModelForImageTextToText.from_pretrained(tiny_path)
    processor = AutoProcessor.from_pretrained(tiny_path)
    assert type(model).__name__ == ARCHITECTURES[config["model_type"]]
    assert processor.chat_template
    assert (tiny_path / "model.safetensors").exists() and (tiny_path / "tokenizer.json").exists()


def test_sft_loss_and_log_likelihood_agree(idm: VLMIDM, pairs) -> None:
    x, y, z = pairs
    loss = idm.sft_loss(x, y, z)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    ll = idm.log_likelihood(x, y, z)
    assert ll.shape == (4,) and torch.isfinite(ll).all() and not ll.requires_grad
    torch.testing.assert_close(ll[:1], -idm.sft_loss(x[:1], y[:1], z[:1]).detach().reshape(1))
    # Batching (answers of different lengths, right-padded) does not change a row's score.
    torch.testing.assert_close(ll[3:], idm.log_likelihood(x[3:], y[3:], z[3:]), atol=1e-5, rtol=1e-5)


def test_sample_layout_and_old_logprobs(idm: VLMIDM, pairs) -> None:
    x, y, _ = pairs
    b, g = 2, 3
    rollout = idm.sample(x[:b], y[:b], num_samples=g, max_new_tokens=6)
    n = b * g
    assert rollout.group_size == g and rollout.num_samples == n and len(rollout.texts) == n
    assert rollout.old_logprobs.shape == rollout.mask.shape and rollout.mask.shape[0] == n
    assert rollout.mask.shape[1] <= 6 and rollout.mask[:, 0].all()
    logp, mask = idm.rollout_logprobs(rollout)
    assert logp.requires_grad and torch.equal(mask, rollout.mask)
    # The sampler's recorded log-probs are what the update scores (off the mask they are 0).
    torch.testing.assert_close(logp.detach().masked_fill(~mask, 0), rollout.old_logprobs, atol=1e-5, rtol=1e-5)

    # Group-major: row b * G + g is scored against pair b alone.
    length = rollout.mask.shape[1]
    completion = rollout.context["input_ids"][:, -length:]
    for row in range(n):
        pair = idm._prompt_inputs(x[row // g : row // g + 1], y[row // g : row // g + 1])
        inputs = _extend(pair, completion[row : row + 1], mask[row : row + 1])
        alone = idm._completion_logprobs(inputs, length, rollout.temperature)  # scored at the sampling temperature
        torch.testing.assert_close(alone[0][mask[row]], rollout.old_logprobs[row][mask[row]], atol=1e-5, rtol=1e-5)

    greedy = idm.sample(x[:b], y[:b], greedy=True, max_new_tokens=6)
    torch.testing.assert_close(greedy.old_logprobs, idm.rollout_logprobs(greedy)[0].masked_fill(~greedy.mask, 0))
    assert len(greedy.texts) == b and greedy.group_size == 1
    with pytest.raises(ValueError, match="greedy"):
        idm.sample(x[:b], y[:b], num_samples=2, greedy=True)


def test_completion_mask_stops_after_first_eos(idm: VLMIDM) -> None:
    eos, other = idm.eos_token_id, idm.eos_token_id + 1
    completion = torch.tensor([[other, eos, other, eos], [other, other, other, other], [eos, other, other, other]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(idm._until_first_stop(completion), expected)


def test_selective_log_softmax_matches_log_softmax() -> None:
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))
    index = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    expected = logits.log_softmax(-1).gather(-1, index[..., None]).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, index), expected)


def test_sft_raises_log_likelihood_of_targets(idm: VLMIDM, pairs) -> None:
    x, y, z = pairs
    before = idm.log_likelihood(x, y, z)
    optimiser = torch.optim.Adam(idm.parameters(), lr=1e-3)
    for _ in range(20):
        optimiser.zero_grad()
        idm.sft_loss(x, y, z).backward()
        optimiser.step()
    after = idm.log_likelihood(x, y, z)
    assert (after > before + 1.0).all(), (before, after)


def test_prompt_setting_changes_scores(tiny_path: Path, pairs) -> None:
    x, y, z = pairs
    default = VLMIDM.from_pretrained(tiny_path).log_likelihood(x, y, z)
    other = VLMIDM.from_pretrained(tiny_path, prompt="Name the edit.").log_likelihood(x, y, z)
    assert not torch.allclose(default, other)
    # A save_pretrained folder keeps its prompt: reloaded without one, it scores as it was trained.
    VLMIDM.from_pretrained(tiny_path, prompt="Name the edit.").save_pretrained(tiny_path.parent / "named")
    reloaded = VLMIDM.from_pretrained(tiny_path.parent / "named")
    assert reloaded.prompt == "Name the edit."
    torch.testing.assert_close(reloaded.log_likelihood(x, y, z), other, rtol=0, atol=0)


def test_save_pretrained_round_trip(idm: VLMIDM, pairs, tmp_path: Path) -> None:
    x, y, z = pairs
    with torch.no_grad():  # move away from the stored initialisation so that the test sees the saved weights
        next(idm.model.parameters()).add_(0.01)
    idm.save_pretrained(tmp_path / "saved")
    reloaded = VLMIDM.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(reloaded.log_likelihood(x, y, z), idm.log_likelihood(x, y, z), rtol=0, atol=0)


def test_missing_checkpoint_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "no-such-idm"
    with pytest.raises(FileNotFoundError, match="no-such-idm") as info:
        VLMIDM(str(path))
    assert "build_tiny" in str(info.value) and not path.exists()


def test_tiny_build_loses_race_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank whose rename finds the folder already written by another rank keeps that one and cleans up."""
    path = tmp_path / "idm"

    def build_while_another_rank_finishes(tmp: Path, seed: int, image_size: int) -> Path:
        (Path(tmp) / "config.json").write_text("{}")
        path.mkdir()
        (path / "config.json").write_text('{"winner": true}')
        return Path(tmp)

    monkeypatch.setitem(idm_module.TINY_BUILDERS, "llava", build_while_another_rank_finishes)
    idm_module._build_atomically(path, "llava", seed=0, image_size=32)
    assert json.loads((path / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in tmp_path.iterdir()] == ["idm"]


def test_one_prefill_per_prompt_samples_what_g_copies_sample(idm: VLMIDM, pairs) -> None:
    """The prompt's KV cache computed once and repeated G times draws the same tokens, with the same recorded
    log-probs, as ``num_return_sequences`` (which prefills G copies, vision tower included)."""
    if idm._mrope:
        pytest.skip("multimodal RoPE: VLMIDM prefills G copies (positions depend on the image grid)")
    x, y, _ = pairs
    prompt = idm._prompt_inputs(x[:2], y[:2])
    settings = dict(do_sample=True, temperature=0.7, top_k=50, max_new_tokens=6, pad_token_id=idm.pad_token_id)
    runs = []
    for share in (False, True):
        torch.manual_seed(1)
        recorder = RecordLogprobs(0.7)
        processors = LogitsProcessorList([recorder])
        sequences = generate_groups(idm.model, prompt, 4, share_prefill=share, logits_processor=processors, **settings)
        runs.append((sequences, recorder.finish(sequences)))
    assert runs[0][0].shape == (8, prompt["input_ids"].shape[1] + 6)
    assert torch.equal(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=1e-5, rtol=1e-5)


def test_a_groups_prompt_runs_once_with_the_same_logprobs_and_gradients(idm: VLMIDM, pairs) -> None:
    """Scoring a rollout with each group's prompt run once (its KV cache repeated G times) gives the log-probs and
    the gradients of G full copies."""
    if idm._mrope:
        pytest.skip("multimodal RoPE: VLMIDM scores G full copies (positions depend on the image grid)")
    x, y, _ = pairs
    rollout = idm.sample(x[:2], y[:2], num_samples=3, max_new_tokens=5)
    idm.train()
    results = []
    for group_size in (1, rollout.group_size):
        idm.zero_grad()
        logp = idm._completion_logprobs(rollout.context, rollout.mask.shape[1], rollout.temperature, group_size)
        (logp * rollout.mask).sum().backward()
        grads = [p.grad.clone() for p in idm.parameters() if p.grad is not None]
        results.append((logp.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    assert len(results[0][1]) == len(results[1][1]) > 0
    for full, shared in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(full, shared, atol=1e-5, rtol=1e-4)


def test_a_groups_repeated_samples_score_once_with_the_same_logprobs_and_gradients(idm: VLMIDM, pairs) -> None:
    """A group's identical rows (the same action drawn twice) run their tail once: log-probs and gradients equal
    those of every row scored in full; the same tokens in another group (other images) still score on their own."""
    if idm._mrope:
        pytest.skip("multimodal RoPE: VLMIDM scores G full copies (positions depend on the image grid)")
    x, y, _ = pairs
    rollout = idm.sample(x[:2], y[:2], num_samples=3, max_new_tokens=5)
    context = {k: v.clone() for k, v in rollout.context.items()}
    length = rollout.mask.shape[1]
    for key in ("input_ids", "attention_mask"):  # rows 1 and 2 repeat row 0; row 3 (group 1) takes its tokens too
        context[key][1:4, -length:] = context[key][0, -length:]
    idm.train()
    results = []
    for group_size in (1, rollout.group_size):
        idm.zero_grad()
        logp = idm._completion_logprobs(context, length, rollout.temperature, group_size)
        logp.sum().backward()
        results.append((logp.detach(), [p.grad.clone() for p in idm.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(results[1][0][1], results[1][0][0]) and not torch.allclose(results[1][0][3], results[1][0][0])
    assert len(results[0][1]) == len(results[1][1]) > 0
    for full, shared in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(full, shared, atol=1e-5, rtol=1e-4)
