"""``decode_loop`` against ``generate``: every token backend's rollouts, sampled and greedy, are the same tokens with
the same recorded log-probs for the same random state; settings it does not take go through ``generate``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessor, LogitsProcessorList

from swirl_vl.models import generation
from swirl_vl.models.base import Rollout
from swirl_vl.models.idm import VLMIDM
from swirl_vl.models.liquid import LiquidFWM, build_tiny_liquid
from swirl_vl.models.token_fwm import TokenFWM
from swirl_vl.models.token_idm import TokenIDM
from tests.sprite_oracles import sprite_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.nn.Module]:
    root = tmp_path_factory.mktemp("decode_loop")
    liquid = build_tiny_liquid(root / "liquid", seed=0)
    return {
        "token_fwm": TokenFWM(str(root / "fwm"), build_tiny=True, seed=0).eval(),
        "liquid_guided": LiquidFWM(str(liquid), image_size=32, guidance_scale=3.0).eval(),
        "llava_idm": VLMIDM(str(root / "idm"), build_tiny="llava").eval(),
        "token_idm": TokenIDM(str(root / "token_idm"), build_tiny=True, seed=0).eval(),
    }


def _through_generate(monkeypatch: pytest.MonkeyPatch, draw: Callable[[], Rollout]) -> Rollout:
    with monkeypatch.context() as patched:
        patched.setattr(generation, "decode_loop_settings", lambda model, kwargs: None)
        return draw()


@pytest.mark.parametrize("name", ["token_fwm", "liquid_guided", "llava_idm", "token_idm"])
@pytest.mark.parametrize("greedy", [False, True])
def test_rollouts_equal_generates(models, name: str, greedy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    model = models[name]
    x, y, z = sprite_pairs(3)
    conditioning = (x, z) if name.endswith(("fwm", "guided")) else (x, y)
    settings = {"greedy": True} if greedy else {"num_samples": 4}
    calls = []
    loop = generation.decode_loop
    monkeypatch.setattr(generation, "decode_loop", lambda *a: calls.append(a) or loop(*a))

    def draw() -> Rollout:
        torch.manual_seed(5)
        with torch.no_grad():
            return model.sample(*conditioning, **settings)

    ours = draw()
    assert len(calls) == 1  # the backend's settings are ones the loop takes
    theirs = _through_generate(monkeypatch, draw)
    assert len(calls) == 1
    for key, value in theirs.context.items():
        assert torch.equal(ours.context[key], value), key
    assert torch.equal(ours.mask, theirs.mask)
    torch.testing.assert_close(ours.old_logprobs, theirs.old_logprobs, atol=1e-5, rtol=1e-5)
    if ours.texts is not None:
        assert ours.texts == theirs.texts
    if ours.images is not None:
        assert torch.equal(ours.images, theirs.images)
    if not greedy:  # the draws differ within a group: the comparison is of sampled tokens, not of one argmax
        rows = ours.context["input_ids"].view(3, 4, -1)
        assert any(len({tuple(r.tolist()) for r in group}) > 1 for group in rows)


def test_settings_resolve_as_generate_and_unknown_ones_go_to_generate(models) -> None:
    lm: AutoModelForCausalLM = models["token_fwm"].lm
    config = generation.decode_loop_settings(lm, {"generation_config": GenerationConfig(max_new_tokens=4)})
    assert config is not None and config.top_k == 50 and config.eos_token_id == lm.generation_config.eos_token_id
    loose = generation.decode_loop_settings(lm, {"max_new_tokens": 4, "do_sample": True, "top_p": 0.9})
    assert loose is not None and loose.top_p == 0.9 and loose.do_sample
    for other in ({"repetition_penalty": 1.2}, {"num_beams": 2}, {"no_repeat_ngram_size": 2}, {"min_p": 0.1}):
        assert generation.decode_loop_settings(lm, {"max_new_tokens": 4, **other}) is None, other
    assert generation.decode_loop_settings(lm, {}) is None  # a length from max_length only: generate's to decide


def test_rows_that_end_are_padded_and_decoding_stops_when_all_have_ended(models) -> None:
    """An end token every row draws at its second step: the rows end there, padded, and nothing runs past it."""
    lm = models["token_fwm"].lm
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    end = int(lm.generation_config.eos_token_id)

    class EndAtSecond(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            forced = torch.full_like(scores, float("-inf"))
            step = input_ids.shape[1] - ids.shape[1]
            forced[:, end if step == 1 else 11] = 0  # token 11, then the end token
            return forced

    inputs = {"input_ids": ids, "attention_mask": mask}
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": end}
    with torch.no_grad():
        ours = generation.generate_groups(
            lm, inputs, 2, logits_processor=LogitsProcessorList([EndAtSecond()]), **kwargs
        )
        theirs = generation.generate_groups(
            lm, inputs, 2, own_loop=False, logits_processor=LogitsProcessorList([EndAtSecond()]), **kwargs
        )
    assert ours.tolist() == theirs.tolist()
    assert ours.shape == (4, 5) and (ours[:, -2:] == torch.tensor([11, end])).all()
