"""VLM-as-judge: answer parsing on fixed strings, the kept score, and a tiny VLM through the whole model path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from swirl_vl.eval.judge import JUDGE_PROMPT, Judge, VLMJudge, kept_score, parse_scores, scores_from_texts
from swirl_vl.models.diffusion_fwm import DiffusionFWM
from swirl_vl.models.idm import image_pair_inputs
from swirl_vl.models.tiny_vlm import build_tiny_llava, build_tiny_qwen2_5_vl
from swirl_vl.training.sft import FWMModule


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"score": [8, 6]}', (8.0, 6.0)),
        ('```json\n{"score": [10, 0], "reasoning": "the cup moved"}\n```', (10.0, 0.0)),
        ("score=[7.5, 3]", (7.5, 3.0)),
        ('{"success": 3, "over_edit": 5}', (3.0, 5.0)),
        ("Over-editing: 2. Success: 9.", (9.0, 2.0)),  # labels win over order
        ("I give it 8/10 for the edit and 6/10 for keeping the rest.", (8.0, 6.0)),
        ("Scores: 7, 9.", (7.0, 9.0)),
    ],
)
def test_parse_reads_the_two_scores(text: str, expected: tuple[float, float]) -> None:
    assert parse_scores(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "the cat sat on the mat", "only 5", '{"score": [11, 3]}', "scores 42 and 17", "<image> ASSISTANT: v2 ok"],
)
def test_unreadable_answers_are_nan(text: str) -> None:
    assert all(math.isnan(v) for v in parse_scores(text))


def test_kept_score_is_the_minimum_and_keeps_nan() -> None:
    nan = math.nan
    score = kept_score(torch.tensor([8.0, 3.0, nan, 5.0]), torch.tensor([6.0, 7.0, 4.0, nan]))
    torch.testing.assert_close(score, torch.tensor([6.0, 3.0, nan, nan]), equal_nan=True)


def test_scores_from_texts_counts_unparsed() -> None:
    scores = scores_from_texts(['{"score": [9, 4]}', "no idea", "Success: 2, over-edit: 8"])
    torch.testing.assert_close(scores.score, torch.tensor([4.0, math.nan, 2.0]), equal_nan=True)
    assert scores.num_unparsed == 1
    metrics = scores.metrics()
    assert set(metrics) == {"judge_score", "judge_success", "judge_over_edit", "judge_unparsed"}
    torch.testing.assert_close(metrics["judge_unparsed"], torch.tensor([0.0, 1.0, 0.0]))


class _FixedJudge(Judge):
    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def answers(self, x: torch.Tensor, z: list[str], y_hat: torch.Tensor) -> list[str]:
        return self.texts


def test_judge_call_checks_batch_sizes() -> None:
    x = torch.rand(2, 3, 8, 8)
    assert _FixedJudge(['{"score": [1, 2]}', "x"])(x, ["a", "b"], x).num_unparsed == 1
    with pytest.raises(AssertionError):
        _FixedJudge(["x"])(x, ["a"], x)


def test_fwm_module_test_metrics_add_the_judges_scores(tmp_path: Path) -> None:
    fwm = DiffusionFWM(str(tmp_path / "fwm"), build_tiny=True, num_inference_steps=2)
    batch = {"x": torch.rand(2, 3, 32, 32), "y": torch.rand(2, 3, 32, 32), "action": ["remove the man", "open it"]}
    assert "judge_score" not in FWMModule(fwm).test_only_metrics(batch)
    judge = _FixedJudge(['{"score": [9, 4]}', "unreadable"])
    metrics = FWMModule(fwm, judge=judge).test_only_metrics(batch)
    torch.testing.assert_close(metrics["judge_score"], torch.tensor([4.0, math.nan]), equal_nan=True)
    torch.testing.assert_close(metrics["judge_unparsed"], torch.tensor([0.0, 1.0]))
    assert "fwm_action_sensitivity" in metrics


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def tiny_judge_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    build = {"llava": build_tiny_llava, "qwen2_5_vl": build_tiny_qwen2_5_vl}[request.param]
    return build(tmp_path_factory.mktemp("judge") / request.param, seed=0, image_size=32)


def test_tiny_vlm_judge_end_to_end(tiny_judge_path: Path) -> None:
    judge = VLMJudge(str(tiny_judge_path), max_new_tokens=6)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y_hat = x.flip(-1)
    z = ["remove the man", "let a boy ski"]
    scores = judge(x, z, y_hat)
    assert scores.success.shape == scores.over_edit.shape == scores.score.shape == (2,)
    assert len(scores.texts) == 2 and all(isinstance(t, str) for t in scores.texts)
    # A random model's answer goes through the same parser as any other, NaNs counted.
    expected = [parse_scores(t) for t in scores.texts]
    torch.testing.assert_close(scores.success, torch.tensor([e[0] for e in expected]), equal_nan=True)
    assert scores.num_unparsed == sum(math.isnan(e[0]) for e in expected)
    assert judge(x, z, y_hat).texts == scores.texts  # greedy: reproducible
    assert not any(p.requires_grad for p in judge.vlm.parameters())


def test_the_judge_sees_both_images_and_the_instruction(tiny_judge_path: Path) -> None:
    judge = VLMJudge(str(tiny_judge_path))
    x = torch.rand(1, 3, 32, 32)
    inputs = image_pair_inputs(judge.vlm.processor, x, x, [judge.prompt.format(instruction="open the door")])
    text = judge.vlm.processor.tokenizer.decode(inputs["input_ids"][0])
    assert "open the door" in text and '{"score": [first, second]}' in text
    assert inputs["pixel_values"].shape[0] > 0


def test_missing_judge_folder_names_the_path(tmp_path: Path, tiny_judge_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="VLMJudge.*no-such-judge.*hf download"):
        VLMJudge(str(tmp_path / "no-such-judge"))
    assert "no-such-judge" in VLMJudge.preflight({"path": str(tmp_path / "no-such-judge")}, "test")[0]
    assert VLMJudge.preflight({"path": str(tiny_judge_path)}, "test") == []
    assert "{instruction}" in JUDGE_PROMPT
    with pytest.raises(ValueError, match="instruction"):
        VLMJudge(str(tmp_path), prompt="rate it")
