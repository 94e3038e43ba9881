"""``TokenIDM``: the inverse dynamics model ``Q_φ(z | x, y)`` on a token-FWM folder (causal LM over text + VQ codes).

Sequence layout of one example (every prompt has the same length, ``P = |bos| + 2L + 4``; answers are padded on
the right after their end-of-sequence token):

    <|bos|> <|boi|> x_1 … x_L <|eoi|> <|boi|> y_1 … y_L <|eoi|> action text <|eos|>
    └──────────────────────────── prompt ────────────────────────────┘ └──── answer ───┘

The folder, tokenizer and image tokenizer are ``TokenFWM``'s, so one language model can serve as both world
models (``TokenIDM.sharing(fwm)``; with LoRA, two adapters on one base). The policy over each answer token is the
softmax over text tokens only: image codes, ``<|boi|>``/``<|eoi|>`` and a padded head's unused rows get ``-inf``
in sampling and scoring alike. As in ``VLMIDM``, every score (SFT loss, Phase I reward, old and new GRPO log-probs)
goes through ``_completion_logprobs``, so the GRPO ratio is exactly 1 before an update.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessorList
from typing_extensions import override

from swirl_vl.models.base import InverseDynamicsModel, Rollout
from swirl_vl.models.generation import RecordLogprobs, generate_groups, tail_logits
from swirl_vl.models.idm import VLMIDM, padded_answers, selective_log_softmax, stop_tokens
from swirl_vl.models.token_fwm import TokenFWM


class TokenIDM(InverseDynamicsModel):
    """``Q_φ(z | x, y)`` as next-token prediction of the action text after both images' VQ codes.

    Args:
        path: TokenFWM model folder (causal LM + tokenizer + ``vq/``).
        build_tiny: when ``path`` holds no model, write a tiny randomly initialised one there first (TokenFWM's).
        seed: initialisation seed of the tiny model.
        vq_path: image tokenizer folder; default ``<path>/vq``.
        image_size: side in pixels the VQ sees; other input sizes are resized to it (None: as the FWM class reads it).
        max_new_tokens: default cap on the length of sampled actions, in tokens.
        gradient_checkpointing: recompute the language model's activations in backward (as ``TokenFWM``).
    """

    def __init__(
        self,
        path: str,
        build_tiny: bool = False,
        seed: int = 0,
        vq_path: str | None = None,
        image_size: int | None = None,
        max_new_tokens: int = 24,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        # The FWM class owns the folder format: loading, the tiny builder and the checks of the image-token vocabulary.
        fwm = self.fwm_class(
            path,
            build_tiny=build_tiny,
            seed=seed,
            vq_path=vq_path,
            image_size=image_size,
            gradient_checkpointing=gradient_checkpointing,
        )
        self._adopt(fwm, max_new_tokens)

    fwm_class: type[TokenFWM] = TokenFWM
    """The world model whose folder format, tokenizer and image codes this IDM reads."""

    @classmethod
    def preflight(cls, init_args: Mapping[str, Any], stage: str) -> list[str]:
        """The folder checks of ``fwm_class`` (the same folder format)."""
        return cls.fwm_class.preflight(init_args, stage)

    @classmethod
    def sharing(cls, fwm: TokenFWM, max_new_tokens: int = 24) -> TokenIDM:
        """An IDM on ``fwm``'s own language model, tokenizer and VQ (same tensors: training one trains the other)."""
        if not isinstance(fwm, cls.fwm_class):
            raise TypeError(f"{cls.__name__} shares a {cls.fwm_class.__name__}'s model, not a {type(fwm).__name__}")
        idm = cls.__new__(cls)
        InverseDynamicsModel.__init__(idm)
        idm._adopt(fwm, max_new_tokens)
        return idm

    def _adopt(self, fwm: TokenFWM, max_new_tokens: int) -> None:
        self.lm = fwm.lm
        self.tokenizer = fwm.tokenizer
        self.vq, self.vq_in_lm = fwm.vq, fwm.vq_in_lm
        self.image_size, self.grid, self.num_image_tokens = fwm.image_size, fwm.grid, fwm.num_image_tokens
        self.max_new_tokens = max_new_tokens
        self._bos, self.boi_id, self.eoi_id, self.pad_id = fwm._bos, fwm.boi_id, fwm.eoi_id, fwm.pad_id
        self.eos_token_id: int | None = self._answer_end_id()
        if self.eos_token_id is None:
            raise ValueError(f"{type(self).__name__} needs a tokenizer with an end-of-sequence token to end actions")
        self.register_buffer("code_token_ids", fwm.code_token_ids, persistent=False)
        self.register_buffer("image_layout", fwm.image_layout, persistent=False)
        self.register_buffer("code_slots", fwm.code_slots, persistent=False)
        self.image_length = fwm.image_length
        stops = stop_tokens(self.lm, self.eos_token_id, self.tokenizer.eos_token_id)
        self.register_buffer("stop_token_ids", stops, persistent=False)
        self._pieces = self._prompt_pieces()
        # Everything that is not text: image codes, image brackets and a padded head's rows beyond the tokenizer.
        vocab = len(fwm.token_to_code)
        non_text = (fwm.token_to_code >= 0).clone()
        non_text[[self.boi_id, self.eoi_id]] = True
        non_text[len(self.tokenizer) :] = True
        self.register_buffer("non_text", non_text, persistent=False)  # (V,) bool
        self.register_buffer("non_text_ids", torch.arange(vocab)[non_text], persistent=False)

    # TokenFWM's image coding and folder writing, verbatim: they read only ``vq``, ``image_size``, ``lm``,
    # ``tokenizer``, ``device`` and the image layout's buffers, which TokenIDM holds under the same names; both
    # models then see identical codes.
    encode_images = TokenFWM.encode_images
    image_token_ids = TokenFWM.image_token_ids
    save_pretrained = TokenFWM.save_pretrained
    _settings = TokenFWM._settings
    device = TokenFWM.device
    # VLMIDM's end-of-answer mask (reads ``stop_token_ids``).
    _until_first_stop = VLMIDM._until_first_stop

    @override
    def train(self, mode: bool = True) -> TokenIDM:
        super().train(mode)
        self.vq.eval()  # the tokenizer is frozen: its codes must not depend on the module's mode
        return self

    @override
    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> TokenIDM:
        """Load a TokenFWM-format folder; ``kwargs`` as ``__init__``."""
        return cls(str(path), **kwargs)

    # ---------------------------------------------------------------------------------------- sequences

    # The folder format's prompt (overridden by each model family, e.g. ``LiquidIDM``).

    def _answer_end_id(self) -> int | None:
        """The token that ends an action (scored, and a stop token of sampling)."""
        return self.tokenizer.eos_token_id

    def _prompt_pieces(self) -> tuple[list[int], list[int], list[int]]:
        """Token ids before ``x``'s codes, between ``x``'s and ``y``'s, and after ``y``'s."""
        return [*self._bos, self.boi_id], [self.eoi_id, self.boi_id], [self.eoi_id]

    def prompt_ids(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Prompts ``before x between y after`` (``_prompt_pieces``; here ``<bos> <boi> x <eoi> <boi> y <eoi>``):
        ids and attention mask, both ``(B, P)`` (every prompt has the same length: no padding)."""
        assert x.shape == y.shape and x.ndim == 4, (x.shape, y.shape)
        codes = self.image_token_ids(self.encode_images(torch.cat([x, y])))  # (2B, S)
        x_tokens, y_tokens = codes.chunk(2)

        def columns(token_ids: list[int]) -> Tensor:
            return torch.tensor(token_ids, dtype=torch.long, device=self.device).expand(x.shape[0], -1)

        before, between, after = map(columns, self._pieces)
        ids = torch.cat([before, x_tokens, between, y_tokens, after], 1)
        return ids, torch.ones_like(ids)

    def _completion_logprobs(
        self, input_ids: Tensor, attention_mask: Tensor, length: int, temperature: float = 1.0, group_size: int = 1
    ) -> Tensor:
        """``(N, L)`` log-probs of the last ``L = length`` tokens of each row under the text-only policy, on logits
        divided by ``temperature``. ``group_size``: rows come in groups that share their prompt; it runs once each."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        logits = tail_logits(self.lm, inputs, length, group_size)  # (N, L, V): position t predicts token t + 1
        logits = logits.masked_fill(self.non_text[: logits.shape[-1]], float("-inf"))
        if temperature != 1.0:
            logits = logits / temperature
        return selective_log_softmax(logits, input_ids[:, -length:])

    def _answer_logprobs(self, x: Tensor, y: Tensor, z: list[str]) -> tuple[Tensor, Tensor]:
        """Per-token log-probs ``(B, L)`` of ``z`` + end-of-sequence given the prompt, and their mask."""
        if len(z) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} image pairs but {len(z)} actions")
        completion, mask = padded_answers(self.tokenizer, z, self.eos_token_id, self.pad_id)
        completion, mask = completion.to(self.device), mask.to(self.device)
        ids, prompt_mask = self.prompt_ids(x, y)
        logp = self._completion_logprobs(
            torch.cat([ids, completion], 1), torch.cat([prompt_mask, mask.long()], 1), completion.shape[1]
        )
        return logp, mask

    # ---------------------------------------------------------------------------------------- interface

    @override
    def sft_loss(self, x: Tensor, y: Tensor, z: list[str]) -> Tensor:
        """Mean NLL over all answer tokens (end-of-sequence included) of the batch; scalar."""
        logp, mask = self._answer_logprobs(x, y, z)
        return -logp.masked_fill(~mask, 0).sum() / mask.sum()

    @override
    @torch.no_grad()
    def log_likelihood(self, x: Tensor, y: Tensor, z: list[str]) -> Tensor:
        """``(B,)`` mean-token ``log Q(z | x, y)`` over the answer tokens and end-of-sequence."""
        logp, mask = self._answer_logprobs(x, y, z)
        return logp.masked_fill(~mask, 0).sum(1) / mask.sum(1)

    @override
    @torch.no_grad()
    def sample(
        self,
        x: Tensor,
        y: Tensor,
        num_samples: int = 1,
        greedy: bool = False,
        temperature: float = 0.7,
        top_k: int = 50,
        max_new_tokens: int | None = None,
    ) -> Rollout:
        """``N = B * num_samples`` actions, group-major (row ``b*G + g``), from one batched ``generate`` call.

        ``x``, ``y``: ``(B, 3, H, W)`` in ``[0, 1]``. Returns texts, ``old_logprobs`` / ``mask`` ``(N, L)`` (tokens up
        to and including the first end-of-sequence) and ``context = {"input_ids", "attention_mask"}`` ``(N, P + L)``.
        Old log-probs are the sampler's own, recorded during ``generate`` at the sampling ``temperature`` (greedy: 1),
        as ``rollout_logprobs`` scores them (equal up to float error). Each prompt is prefilled once.
        """
        if greedy and num_samples != 1:
            raise ValueError(f"greedy decoding gives one action per pair; got num_samples={num_samples}")
        ids, prompt_mask = self.prompt_ids(x, y)
        sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_k": top_k}
        # A full config, so that a checkpoint's generation_config.json cannot reshape the policy.
        config = GenerationConfig(
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            top_p=1.0,
            repetition_penalty=1.0,
            suppress_tokens=self.non_text_ids.tolist(),
            eos_token_id=self.stop_token_ids.tolist(),
            pad_token_id=self.pad_id,
            use_cache=True,
            **sampling,
        )
        scored_temperature = 1.0 if greedy else temperature
        recorder = RecordLogprobs(scored_temperature)
        prompt = {"input_ids": ids, "attention_mask": prompt_mask}
        sequences = generate_groups(
            self.lm, prompt, num_samples, generation_config=config, logits_processor=LogitsProcessorList([recorder])
        )
        completion = sequences[:, ids.shape[1] :]  # (N, L)
        mask = self._until_first_stop(completion)
        completion = completion.masked_fill(~mask, self.pad_id)
        texts = [t.strip() for t in self.tokenizer.batch_decode(completion, skip_special_tokens=True)]
        context = {
            "input_ids": torch.cat([ids.repeat_interleave(num_samples, 0), completion], 1),
            "attention_mask": torch.cat([prompt_mask.repeat_interleave(num_samples, 0), mask.long()], 1),
        }
        # The sampler's own log-probs (no second forward); positions after the first stop are 0.
        old_logprobs = recorder.finish(sequences).masked_fill(~mask, 0.0)
        return Rollout(
            group_size=num_samples,
            old_logprobs=old_logprobs,
            mask=mask,
            texts=texts,
            context=context,
            temperature=scored_temperature,
        )

    @override
    def rollout_logprobs(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """Per-token log-probs ``(N, L)`` of the rollout's actions under the current weights (with grad), and mask."""
        ids, attention_mask = rollout.context["input_ids"], rollout.context["attention_mask"]
        length, g = rollout.mask.shape[1], rollout.group_size
        return self._completion_logprobs(ids, attention_mask, length, rollout.temperature, g), rollout.mask
