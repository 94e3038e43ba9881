"""VLM-as-judge scores of edited images, with the protocol SWIRL reports on Aurora-Bench (VIEScore's semantic
consistency, Ku et al. 2024).

The judge sees the source image, the instruction and the edited image, and gives two integers on 0–10: *success*
(the edit does what the instruction asks) and *over-edit* (10: nothing the instruction does not ask for changed).
The kept score is the minimum of the two, so an edit scores high only when it is both right and minimal. An answer
the parser cannot read gives NaN for all three and is counted, never guessed.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from swirl_vl.models.base import missing_checkpoint_error
from swirl_vl.models.idm import VLMIDM, image_pair_inputs

JUDGE_PROMPT = (
    "You are judging an image edit. The first image is the source; the second is the result of editing it with "
    'the instruction: "{instruction}"\n'
    "Give two scores from 0 to 10. The first: how well the edit carries out the instruction (0: not at all, "
    "10: perfectly). The second: how little the edit changed beyond what the instruction asks (0: the image is "
    "changed everywhere, 10: nothing else changed).\n"
    'Answer in JSON only: {{"score": [first, second]}}'
)
"""Format string with ``{instruction}``; doubled braces are literal."""

_NUMBER = r"(\d+(?:\.\d+)?)"
_JSON_SCORES = re.compile(r'"?scores?"?\s*[:=]\s*\[\s*' + _NUMBER + r"\s*,\s*" + _NUMBER + r"\s*\]", re.IGNORECASE)
_LABELLED = {
    "success": re.compile(r"success\w*\W{0,10}?" + _NUMBER, re.IGNORECASE),
    "over_edit": re.compile(r"over[\s_-]?edit\w*\W{0,10}?" + _NUMBER, re.IGNORECASE),
}
_OUT_OF_TEN = re.compile(r"\s*/\s*10\b")
_BARE_NUMBER = re.compile(r"(?<![\w.])" + _NUMBER + r"(?!\w|\.\d)")  # "8." ends a sentence; "v2" is no score


def parse_scores(text: str) -> tuple[float, float]:
    """``(success, over_edit)`` read from a judge's answer, or ``(nan, nan)`` when it holds no valid pair.

    Tried in order: a JSON-like ``"score": [a, b]``; labelled ``success … a`` and ``over-edit … b``; the first two
    bare numbers once ``/10`` denominators are dropped ("8/10, 6/10"). Both must lie in ``[0, 10]``.
    """
    found = _JSON_SCORES.search(text)
    if found:
        pair = found.groups()
    else:
        labelled = [pattern.search(text) for pattern in _LABELLED.values()]
        if all(labelled):
            pair = tuple(m.group(1) for m in labelled)
        else:
            numbers = _BARE_NUMBER.findall(_OUT_OF_TEN.sub("", text))
            pair = tuple(numbers[:2]) if len(numbers) >= 2 else ()
    values = tuple(float(v) for v in pair)
    if len(values) != 2 or not all(0 <= v <= 10 for v in values):
        return math.nan, math.nan
    return values


def kept_score(success: Tensor, over_edit: Tensor) -> Tensor:
    """``(B,)`` minimum of the two scores; NaN where either is NaN (an unread answer stays unread)."""
    return torch.minimum(success, over_edit)


@dataclass
class JudgeScores:
    """Per-example judge outputs for a batch of ``B`` edits."""

    success: Tensor
    """``(B,)`` float, 0–10, NaN where the answer was unreadable."""
    over_edit: Tensor
    """``(B,)`` float, 0–10 (10: nothing beyond the instruction changed), NaN where unreadable."""
    texts: list[str]
    """The judge's raw answers."""

    @property
    def score(self) -> Tensor:
        """``(B,)`` the kept score, ``min(success, over_edit)``."""
        return kept_score(self.success, self.over_edit)

    @property
    def num_unparsed(self) -> int:
        return int(self.score.isnan().sum())

    def metrics(self) -> dict[str, Tensor]:
        """Per-example ``{name: (B,)}`` in the evaluation's format: the scores (NaN where unread, which the test report
        skips) and ``judge_unparsed`` (1 where unread), whose mean is the share of answers left out."""
        return {
            "judge_score": self.score,
            "judge_success": self.success,
            "judge_over_edit": self.over_edit,
            "judge_unparsed": self.score.isnan().float(),
        }


def scores_from_texts(texts: list[str]) -> JudgeScores:
    """Parse ``B`` answers into ``JudgeScores``."""
    pairs = [parse_scores(t) for t in texts]
    success = torch.tensor([p[0] for p in pairs], dtype=torch.float32)
    over_edit = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
    return JudgeScores(success=success, over_edit=over_edit, texts=list(texts))


class Judge(ABC):
    """Scores edits ``x → ŷ`` under instructions ``z``; backends differ only in how they produce the answers."""

    @abstractmethod
    def answers(self, x: Tensor, z: list[str], y_hat: Tensor) -> list[str]:
        """``B`` raw answers for source images ``x`` and edited images ``y_hat`` ``(B, 3, H, W)`` in ``[0, 1]``."""

    def __call__(self, x: Tensor, z: list[str], y_hat: Tensor) -> JudgeScores:
        assert x.shape[0] == len(z) == y_hat.shape[0], (x.shape, len(z), y_hat.shape)
        return scores_from_texts(self.answers(x, z, y_hat))


class VLMJudge(Judge):
    """A local transformers image-text-to-text model (e.g. ``Qwen/Qwen2.5-VL-7B-Instruct``) as the judge.

    It reads two images and a prompt, as the IDM does, so it loads through ``VLMIDM`` (left padding, pad and stop
    tokens, the two-image chat prompt) and asks ``prompt`` instead; answers are greedy, so scores are reproducible.
    Not an ``nn.Module``: a LightningModule that holds it does not put the judge's weights in its checkpoints.

    Args:
        path: model folder (config, weights, processor with a chat template). Nothing is downloaded.
        prompt: format string with ``{instruction}``.
        max_new_tokens: cap on the answer's length, in tokens.
        device: where to run the judge.
    """

    def __init__(self, path: str, prompt: str = JUDGE_PROMPT, max_new_tokens: int = 32, device: str = "cpu") -> None:
        if "{instruction}" not in prompt:
            raise ValueError("the judge prompt must contain '{instruction}'")
        if (error := _missing_folder(Path(path))) is not None:
            raise error
        self.vlm = VLMIDM(path, max_new_tokens=max_new_tokens).eval().requires_grad_(False).to(device)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens

    @classmethod
    def preflight(cls, init_args: Mapping[str, Any], stage: str) -> list[str]:
        """What ``cls(**init_args)`` would find missing, checked without loading anything (the CLI asks first)."""
        error = _missing_folder(Path(init_args["path"]))
        return [] if error is None else [str(error)]

    @torch.no_grad()
    def answers(self, x: Tensor, z: list[str], y_hat: Tensor) -> list[str]:
        vlm = self.vlm
        prompts = [self.prompt.format(instruction=instruction) for instruction in z]
        inputs = image_pair_inputs(vlm.processor, x, y_hat, prompts).to(vlm.device)
        prompt_len = inputs["input_ids"].shape[1]
        sequences = vlm.model.generate(
            **inputs,
            do_sample=False,
            # Set explicitly so that a checkpoint's generation_config.json cannot change the judge's answers.
            repetition_penalty=1.0,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=vlm.stop_token_ids.tolist(),
            pad_token_id=vlm.pad_token_id,
        )
        # Rows that stop early are padded; skip_special_tokens drops the pads and stop tokens.
        completion = sequences[:, prompt_len:]
        return [t.strip() for t in vlm.processor.tokenizer.batch_decode(completion, skip_special_tokens=True)]


def _missing_folder(path: Path) -> FileNotFoundError | None:
    if (path / "config.json").is_file():
        return None
    return missing_checkpoint_error(
        path,
        "VLMJudge: image-text-to-text model folder (config.json)",
        f"Download one: `hf download Qwen/Qwen2.5-VL-7B-Instruct --local-dir {path}` (any transformers "
        "image-text-to-text model with its processor and chat template works).",
    )
