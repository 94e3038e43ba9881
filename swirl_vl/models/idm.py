"""``VLMIDM``: the inverse dynamics model ``Q_φ(z | x, y)`` as any transformers image-text-to-text VLM.

One user turn holds the two images and the prompt; the assistant answer is the action text, closed by the
tokenizer's end-of-sequence token. Every score (SFT loss, Phase I reward, GRPO log-probs, old log-probs) goes
through ``_completion_logprobs``, so that the GRPO ratio is exactly 1 before any update.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import AutoModelForImageTextToText, AutoProcessor, BatchFeature, LogitsProcessorList, ProcessorMixin

from swirl_vl.models.base import (
    InverseDynamicsModel,
    Rollout,
    enable_gradient_checkpointing,
    missing_checkpoint_error,
    saved_settings,
    write_folder_atomically,
    write_settings,
)
from swirl_vl.models.generation import RecordLogprobs, generate_groups, tail_logits
from swirl_vl.models.janus import JanusFWM, build_tiny_janus
from swirl_vl.models.tiny_vlm import build_tiny_llava, build_tiny_qwen2_5_vl

TINY_BUILDERS = {"llava": build_tiny_llava, "qwen2_5_vl": build_tiny_qwen2_5_vl, "janus": build_tiny_janus}

_TOKEN_TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")
"""Per-token processor outputs besides ids and mask that a completion must extend (text tokens are type 0)."""


DEFAULT_PROMPT = "Which action turns the first image into the second?"


class VLMIDM(InverseDynamicsModel):
    """An ``AutoModelForImageTextToText`` + ``AutoProcessor`` folder used as the IDM.

    Args:
        path: model folder in the Hugging Face format (e.g. a downloaded ``Qwen/Qwen2.5-VL-3B-Instruct``).
        build_tiny: if ``path`` does not exist, build a tiny random model of this architecture there first.
        seed: initialisation seed of the tiny model.
        prompt: user text that follows the two images; None: the one a ``save_pretrained`` folder was trained
            with, else ``DEFAULT_PROMPT``.
        max_new_tokens: default cap on the length of sampled actions, in tokens.
        image_size: side of the square images the tiny model is built for, in pixels.
        gradient_checkpointing: recompute the model's activations in backward (less memory, more compute; rollouts
            are then scored as full copies of each prompt).
    """

    def __init__(
        self,
        path: str,
        build_tiny: Literal["llava", "qwen2_5_vl", "janus"] | None = None,
        seed: int = 0,
        prompt: str | None = None,
        max_new_tokens: int = 24,
        image_size: int = 32,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        folder = Path(path)
        if not folder.exists() and build_tiny is not None:
            _build_atomically(folder, build_tiny, seed=seed, image_size=image_size)
        if (error := _missing_folder(folder, build_tiny=None)) is not None:
            raise error
        model = AutoModelForImageTextToText.from_pretrained(folder)
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        prompt = prompt if prompt is not None else saved_settings(folder).get("prompt", DEFAULT_PROMPT)
        self._adopt(model, AutoProcessor.from_pretrained(folder), prompt, max_new_tokens, image_size)

    @classmethod
    def sharing(cls, fwm: nn.Module, max_new_tokens: int = 24, prompt: str = DEFAULT_PROMPT) -> VLMIDM:
        """An IDM on a unified model's world model's own model and processor (same tensors): Janus-Pro's
        understanding path beside ``JanusFWM``'s generation path, the shared-base variant on one real model."""
        if not isinstance(fwm, JanusFWM):
            raise TypeError(f"VLMIDM shares a JanusFWM's model, not a {type(fwm).__name__}")
        idm = cls.__new__(cls)
        InverseDynamicsModel.__init__(idm)
        idm._adopt(fwm.model, fwm.processor, prompt, max_new_tokens, fwm.image_size)
        return idm

    def _adopt(self, model: nn.Module, processor: ProcessorMixin, prompt: str, max_new_tokens: int, image_size: int):
        self.model, self.processor = model, processor
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.image_size = image_size

        tokenizer = self.processor.tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # Prompts are padded on the left so that every completion starts in the same column: generation needs it,
        # and scoring then keeps logits for the last L + 1 positions only.
        tokenizer.padding_side = "left"
        self.eos_token_id: int = tokenizer.eos_token_id
        self.pad_token_id: int = tokenizer.pad_token_id
        # Any of these ends an answer (Qwen checkpoints stop on <|im_end|> or <|endoftext|>).
        self.register_buffer("stop_token_ids", stop_tokens(self.model, self.eos_token_id), persistent=False)
        # Multimodal-RoPE models (Qwen2-VL family) derive 3-D positions from the image grid themselves.
        self._mrope = hasattr(self.model.model, "get_rope_index")

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> VLMIDM:
        """Load a folder written by ``save_pretrained`` or a real checkpoint; ``kwargs`` as ``__init__``."""
        return cls(str(path), **kwargs)

    @classmethod
    def preflight(cls, init_args: Mapping[str, Any], stage: str) -> list[str]:
        """What ``cls(**init_args)`` would find missing, checked without loading anything (the CLI asks first)."""
        error = _missing_folder(Path(init_args["path"]), init_args.get("build_tiny"))
        return [] if error is None else [str(error)]

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
        write_settings(path, {"prompt": self.prompt})

    @property
    def device(self) -> torch.device:
        return self.stop_token_ids.device

    def sft_loss(self, x: Tensor, y: Tensor, z: list[str]) -> Tensor:
        """Mean NLL over all answer tokens (end-of-sequence included) of the batch; scalar."""
        logp, mask = self._answer_logprobs(x, y, z)
        return -(logp * mask).sum() / mask.sum()

    @torch.no_grad()
    def log_likelihood(self, x: Tensor, y: Tensor, z: list[str]) -> Tensor:
        """``(B,)`` mean-token ``log Q(z | x, y)`` over the answer tokens and end-of-sequence."""
        logp, mask = self._answer_logprobs(x, y, z)
        return (logp * mask).sum(1) / mask.sum(1)

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
        """``N = B * num_samples`` actions, group-major, from one batched ``generate`` call (each prompt prefilled once).

        ``x``, ``y``: ``(B, 3, H, W)`` in ``[0, 1]``. Old log-probs are the sampler's own, recorded during ``generate``
        at the sampling ``temperature`` (greedy: 1), as ``rollout_logprobs`` scores them (equal up to float error).
        """
        if greedy and num_samples != 1:
            raise ValueError(f"greedy decoding gives one action per pair; got num_samples={num_samples}")
        prompt = self._prompt_inputs(x, y)
        batch, prompt_len = prompt["input_ids"].shape
        sampling = {} if greedy else {"temperature": temperature, "top_k": top_k}
        scored_temperature = 1.0 if greedy else temperature
        recorder = RecordLogprobs(scored_temperature)
        sequences = generate_groups(
            self.model,
            prompt,
            num_samples,
            share_prefill=not self._mrope,
            do_sample=not greedy,
            **sampling,
            # Set explicitly so that a checkpoint's generation_config.json cannot reshape the policy.
            top_p=1.0,
            repetition_penalty=1.0,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            eos_token_id=self.stop_token_ids.tolist(),
            pad_token_id=self.pad_token_id,
            use_cache=True,
            logits_processor=LogitsProcessorList([recorder]),
        )
        completion = sequences[:, prompt_len:]  # (N, L)
        mask = self._until_first_stop(completion)
        completion = completion.masked_fill(~mask, self.pad_token_id)
        texts = [t.strip() for t in self.processor.tokenizer.batch_decode(completion, skip_special_tokens=True)]
        context = _extend(_repeat_groups(prompt, batch, num_samples), completion, mask)
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

    def rollout_logprobs(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """Per-token log-probs ``(N, L)`` of the rollout's actions under the current weights (with grad), and mask."""
        context, length = rollout.context, rollout.mask.shape[1]
        return self._completion_logprobs(context, length, rollout.temperature, rollout.group_size), rollout.mask

    def _prompt_inputs(self, x: Tensor, y: Tensor) -> BatchFeature:
        """Processor outputs for ``B`` user turns ``[image x, image y, prompt]``, left-padded."""
        return image_pair_inputs(self.processor, x, y, [self.prompt] * x.shape[0]).to(self.device)

    def _answer_logprobs(self, x: Tensor, y: Tensor, z: list[str]) -> tuple[Tensor, Tensor]:
        """Per-token log-probs ``(B, L)`` of ``z`` + end-of-sequence given the prompt, and their mask."""
        assert len(z) == x.shape[0], (len(z), x.shape)
        completion, mask = padded_answers(self.processor.tokenizer, z, self.eos_token_id, self.pad_token_id)
        completion, mask = completion.to(self.device), mask.to(self.device)
        inputs = _extend(self._prompt_inputs(x, y), completion, mask)
        return self._completion_logprobs(inputs, completion.shape[1]), mask

    def _completion_logprobs(
        self, inputs: Mapping[str, Tensor], length: int, temperature: float = 1.0, group_size: int = 1
    ) -> Tensor:
        """``(N, L)`` log-probs of the last ``L = length`` tokens of ``inputs["input_ids"]``, logits / ``temperature``.

        ``group_size``: rows come in groups that share their prompt (a rollout); it then runs once per group.
        """
        # Multimodal-RoPE models derive positions from the image grid: no shared prompt, no mask positions.
        shared = 1 if self._mrope else group_size
        logits = tail_logits(self.model, inputs, length, shared, _TOKEN_TYPE_KEYS, mask_positions=not self._mrope)
        if temperature != 1.0:
            logits = logits / temperature
        return selective_log_softmax(logits, inputs["input_ids"][:, -length:])

    def _until_first_stop(self, completion: Tensor) -> Tensor:
        """``(N, L)`` bool: tokens up to and including the first stop token (or all, if none)."""
        is_stop = torch.isin(completion, self.stop_token_ids)
        stops_before = is_stop.long().cumsum(1) - is_stop.long()
        return stops_before == 0


def image_pair_inputs(processor: ProcessorMixin, x: Tensor, y: Tensor, prompts: list[str]) -> BatchFeature:
    """Processor outputs (on the CPU) for ``B`` user turns ``[image x_i, image y_i, prompts[i]]`` in the folder's chat
    template, ready for generation; ``x``, ``y``: ``(B, 3, H, W)`` in ``[0, 1]``. Padded on the processor's side."""
    assert x.shape == y.shape and x.ndim == 4 and len(prompts) == x.shape[0], (x.shape, y.shape, len(prompts))
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": prompt}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for prompt in prompts
    ]
    # Generated images may overshoot [0, 1] slightly; the processor only normalises (no PIL round trip).
    x, y = x.detach().float().clamp(0, 1), y.detach().float().clamp(0, 1)
    images = [[xi, yi] for xi, yi in zip(x, y)]
    return processor(text=texts, images=images, padding=True, do_rescale=False, return_tensors="pt")


def padded_answers(tokenizer: Any, z: list[str], end_id: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Actions ``z`` tokenized, each followed by ``end_id``, right-padded: ids ``(B, L)`` and their mask ``(B, L)``."""
    answers = [row + [end_id] for row in tokenizer(list(z), add_special_tokens=False)["input_ids"]]
    length = max(map(len, answers))
    completion = torch.full((len(answers), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(answers), length, dtype=torch.bool)
    for i, row in enumerate(answers):
        completion[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    return completion, mask


def stop_tokens(model: Any, *end_ids: int | None) -> Tensor:
    """Sorted ids that end a sampled answer: ``end_ids`` and the checkpoint's ``generation_config`` end tokens."""
    configured = model.generation_config.eos_token_id
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return torch.tensor(sorted({*end_ids, *configured} - {None}))


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """``log_softmax(logits)`` gathered at ``index``: ``(N, L, V), (N, L) -> (N, L)``, float32.

    Row by row with ``gather - logsumexp``, so that no ``(N, L, V)`` log-softmax tensor is materialised (a
    150k-token vocabulary makes it gigabytes); only one row's float32 copy exists at a time in the forward pass.
    """
    rows = []
    for row_logits, row_index in zip(logits, index):
        row_logits = row_logits.float()
        rows.append(row_logits.gather(-1, row_index[:, None]).squeeze(-1) - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def _repeat_groups(inputs: Mapping[str, Tensor], batch: int, group_size: int) -> dict[str, Tensor]:
    """Repeat each example's block of every processor output ``group_size`` times, group-major.

    Outputs are laid out per example (``input_ids``: one row each) or per image (``pixel_values``,
    ``image_grid_thw``: two images, or two images' patches, each); all examples have equally many, so each
    tensor splits evenly into ``batch`` blocks.
    """
    out = {}
    for key, value in inputs.items():
        assert value.shape[0] % batch == 0, (key, value.shape, batch)
        blocks = value.reshape(batch, value.shape[0] // batch, *value.shape[1:])
        out[key] = blocks.repeat_interleave(group_size, dim=0).flatten(0, 1)
    return out


def _extend(inputs: Mapping[str, Tensor], completion: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Append the completion ``(N, L)`` to the prompt's per-token tensors; image tensors are kept as they are."""
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], completion], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], mask.to(inputs["attention_mask"].dtype)], dim=1)
    for key in _TOKEN_TYPE_KEYS:
        if key in inputs:
            out[key] = torch.cat([inputs[key], torch.zeros_like(completion, dtype=inputs[key].dtype)], dim=1)
    return out


def _missing_folder(path: Path, build_tiny: str | None) -> FileNotFoundError | None:
    """The error for a folder that holds no transformers model, or None when loading can go on."""
    if (path / "config.json").is_file() or (build_tiny is not None and not path.exists()):
        return None
    return missing_checkpoint_error(
        path,
        "VLMIDM: image-text-to-text model folder (config.json)",
        f"Download one, e.g. `hf download Qwen/Qwen2.5-VL-3B-Instruct --local-dir {path}` (any transformers "
        "image-text-to-text model with its processor works, Janus-Pro's too), or set build_tiny: "
        f"{' / '.join(TINY_BUILDERS)} to build a tiny random model there (only where the path does not exist yet).",
    )


def _build_atomically(path: Path, architecture: str, seed: int, image_size: int) -> None:
    """Build a tiny model at ``path`` through ``write_folder_atomically`` (never half-written, race-safe)."""
    if architecture not in TINY_BUILDERS:
        raise ValueError(f"build_tiny must be one of {sorted(TINY_BUILDERS)}; got {architecture!r}")
    write_folder_atomically(path, lambda tmp: TINY_BUILDERS[architecture](tmp, seed=seed, image_size=image_size))
