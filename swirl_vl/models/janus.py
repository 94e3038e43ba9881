"""Janus-Pro (Chen et al. 2025) as the world model: one unified transformer that reads images through a SigLIP tower
(the understanding path) and writes them as VQ codes through its own generation head (the generation path).

``JanusFWM`` reads a transformers Janus folder as published (``deepseek-community/Janus-Pro-1B`` / ``-7B``:
``JanusForConditionalGeneration`` + ``JanusProcessor``). ``P_θ(y | x, z)`` is the generation path conditioned on
the understanding path: the user turn holds ``x`` (SigLIP features in the ``<image_placeholder>`` slots, as Janus
reads images) and the action, the assistant turn opens ``<begin_of_image>``, and ``y``'s codes of Janus's own VQ
(``model.vqmodel``) follow, each predicted by ``generation_head`` and fed back through ``generation_embeddings`` →
``generation_aligner``, exactly as ``JanusForConditionalGeneration.generate(generation_mode="image")`` runs its loop:

    <|User|>: <begin_of_image> [x: N SigLIP features] <end_of_image> \\n {action} \\n\\n <|Assistant|>:<begin_of_image>
    y_1 … y_L   (generation head; the language model's own head is never used)

Without an ``x`` in the prompt this is Janus's text-to-image loop token for token (tested against its ``generate``).
The IDM on a Janus folder is ``VLMIDM`` (the understanding path: two images and a question, text out); with
``build_tiny: janus`` it writes the tiny folder below. ``build_tiny_janus`` writes the published layout at ~4 MB:
a 4-layer Llama, a 2-layer SigLIP tower, a small VQ and a byte-level BPE tokenizer with Janus's special tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    JanusConfig,
    JanusImageProcessor,
    JanusProcessor,
    JanusVisionConfig,
    JanusVQVAEConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from typing_extensions import override

from swirl_vl.models.base import (
    ForwardWorldModel,
    Rollout,
    enable_gradient_checkpointing,
    missing_checkpoint_error,
    saved_settings,
    write_folder_atomically,
    write_settings,
)
from swirl_vl.models.generation import left_pad_positions, per_distinct_row
from swirl_vl.models.text import build_text_tokenizer
from swirl_vl.models.tiny_vlm import TINY_TEXT_SIZE, special_token_ids, write_tiny_vlm

IMAGE_TOKEN, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"

JANUS_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] | lower == 'user' %}<|User|>: {% else %}<|Assistant|>: {% endif %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{% if not loop.first %}{{ '\\n' }}{% endif %}<image_placeholder>"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% elif content['type'] == 'text' %}{{ content['text'] | trim }}{% endif %}"
    "{% endfor %}{{ '\\n\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)
"""The turns of Janus-Pro's published template (``<|User|>: … \\n\\n<|Assistant|>:``, images as
``<image_placeholder>`` on their own lines) for user turns and a generation prompt, which is all SWIRL writes."""


def _normalise(images: Tensor) -> Tensor:
    return images.detach().float().clamp(0, 1)


class JanusFWM(ForwardWorldModel):
    """``P_θ(y | x, z)`` on a Janus folder: ``y``'s VQ codes from the generation head, after ``x`` and the action."""

    default_image_size = 384
    fsdp2_unsupported = (
        "its image loop calls the model's generation head and embeddings outside the model's forward, where FSDP2 "
        "would leave their weights sharded"
    )

    def __init__(
        self,
        path: str,
        build_tiny: bool = False,
        seed: int = 0,
        image_size: int | None = None,
        guidance_scale: float = 1.0,
        unconditional_dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        """
        Args:
            path: Janus folder (``JanusForConditionalGeneration`` + ``JanusProcessor``).
            build_tiny: when ``path`` holds no model, write a tiny randomly initialised one there first.
            seed: initialisation seed of the tiny model.
            image_size: side in pixels the VQ codes (Janus-Pro: 384, 24 × 24 = 576 codes); None: the VQ's own.
            guidance_scale: Janus's classifier-free guidance on the generation head's logits,
                ``u + s · (c − u)``, against the prompt with every token but ``<bos>`` and ``<begin_of_image>``
                replaced by padding (so without ``x`` and the action), as Janus's ``generate`` runs it (Janus-Pro
                samples at 5); 1: unguided. GRPO scores the guided policy it sampled; likelihoods stay unguided.
            unconditional_dropout: share of SFT examples trained after the unconditional prompt instead (Janus-Pro
                was trained with 10%), so that the branch guidance subtracts stays trained.
            gradient_checkpointing: recompute the language model's activations in backward.
        """
        super().__init__()
        if guidance_scale < 1:
            raise ValueError(f"guidance_scale must be ≥ 1 (1: unguided); got {guidance_scale}")
        if not 0 <= unconditional_dropout <= 1:
            raise ValueError(f"unconditional_dropout must be in [0, 1]; got {unconditional_dropout}")
        self.guidance_scale, self.unconditional_dropout = guidance_scale, unconditional_dropout
        folder = Path(path)
        if not (folder / "config.json").is_file():
            if not build_tiny:
                raise self._missing(path)
            write_folder_atomically(folder, lambda tmp: build_tiny_janus(tmp, seed=seed))
        self.model = AutoModelForImageTextToText.from_pretrained(folder)
        self.processor = AutoProcessor.from_pretrained(folder)
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        vq = self.model.model.vqmodel
        vq.requires_grad_(False)  # the frozen image tokenizer is never trained
        side = vq.config.num_patches
        self.num_image_tokens = side * side
        own_size = side * 2 ** (len(vq.config.channel_multiplier) - 1)
        self.image_size = image_size if image_size is not None else saved_settings(folder).get("image_size", own_size)
        if self.image_size != own_size:
            raise ValueError(f"the Janus VQ at '{path}' codes {own_size}-pixel images, not {self.image_size}")
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.image_token_id = self.model.config.image_token_id
        # The tokens Janus's unconditional prompt keeps (its generate: BOS and the image-start token).
        self.kept_ids = [i for i in (tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids(BOI)) if i is not None]
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @classmethod
    def preflight(cls, init_args: Mapping[str, Any], stage: str) -> list[str]:
        """The folder ``cls(**init_args)`` reads, checked without loading anything (the CLI asks first)."""
        path = Path(init_args["path"])
        return [] if (path / "config.json").is_file() or init_args.get("build_tiny") else [str(cls._missing(path))]

    @classmethod
    def _missing(cls, path: str | Path) -> FileNotFoundError:
        fix = (
            "Download Janus-Pro in the transformers format (`hf download deepseek-community/Janus-Pro-7B --local-dir "
            "PATH`, or Janus-Pro-1B), or set build_tiny: true to write a tiny randomly initialised model there."
        )
        return missing_checkpoint_error(path, "JanusFWM checkpoint", fix)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def core(self) -> torch.nn.Module:
        """The ``JanusModel`` (language model, both visual paths), with this world model's LoRA adapter active when
        it has one: on a shared base the IDM's adapter may have run last."""
        activate = getattr(self.model, "activate", None)
        if activate is not None:
            activate()
        return self.model.model

    # ---------------------------------------------------------------------------------------- sequences

    def prompts(self, z: list[str]) -> list[str]:
        """The chat text of each prompt: a user turn with ``x`` and the action, then the generation prompt."""
        turns = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": a}]}] for a in z]
        texts = [self.processor.apply_chat_template(t, add_generation_prompt=True, tokenize=False) for t in turns]
        return [text + BOI for text in texts]  # as JanusProcessor(generation_mode="image") ends a prompt

    def prompt_inputs(self, x: Tensor, z: list[str]) -> dict[str, Tensor]:
        """The processor's left-padded ``input_ids``, ``attention_mask`` and ``pixel_values`` for ``(x, z)``."""
        if len(z) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} images but {len(z)} actions")
        images = list(_normalise(x))
        inputs = self.processor(
            text=self.prompts(z), images=images, padding=True, do_rescale=False, return_tensors="pt"
        )
        return dict(inputs.to(self.device))

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None = None) -> Tensor:
        """Token embeddings ``(B, T, D)``, with the images' SigLIP features in the placeholder slots, as
        ``JanusModel.forward`` places them."""
        inner = self.core
        embeds = inner.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        features = inner.get_image_features(pixel_values.to(embeds.dtype)).pooler_output
        slots = (input_ids == self.image_token_id).unsqueeze(-1)
        return embeds.masked_scatter(slots, features.reshape(-1, embeds.shape[-1]).to(embeds.dtype))

    def unconditional_ids(self, input_ids: Tensor) -> Tensor:
        """Janus's unconditional prompt: every token but BOS and ``<begin_of_image>`` replaced by padding."""
        kept = torch.isin(input_ids, torch.tensor(self.kept_ids, device=input_ids.device))
        return input_ids.masked_fill(~kept, self.pad_id)

    def prompt_embeds(
        self, x: Tensor, z: list[str], unconditional: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Prompt embeddings ``(B, T, D)``, their attention mask ``(B, T)``, and with guidance the unconditional
        prompts' embeddings (same mask). ``unconditional``: ``(B,)`` bool, rows that get the unconditional prompt
        in place of their own (SFT's dropout)."""
        inputs = self.prompt_inputs(x, z)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        embeds = self.embed(ids, inputs["pixel_values"])
        plain = (
            self.embed(self.unconditional_ids(ids)) if unconditional is not None or self.guidance_scale != 1 else None
        )
        if unconditional is not None:
            embeds = torch.where(unconditional.to(embeds.device)[:, None, None], plain, embeds)
        return embeds, mask, plain if self.guidance_scale != 1 else None

    def code_embeds(self, codes: Tensor) -> Tensor:
        """``(N, L)`` VQ codes → the language model's inputs for them (generation embeddings → aligner)."""
        return self.model.prepare_embeddings_for_image_generation(codes)

    def encode_images(self, images: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` → Janus VQ codes ``(B, L)``."""
        pixels = torch.nn.functional.interpolate(_normalise(images), size=self.image_size, mode="bicubic")
        vq = self.model.model.vqmodel
        return vq.encode(pixels.clamp(0, 1).to(self.device) * 2 - 1).image_tokens.view(images.shape[0], -1)

    @torch.no_grad()
    def decode_codes(self, codes: Tensor) -> Tensor:
        """VQ codes ``(N, L)`` → images ``(N, 3, image_size, image_size)`` in ``[0, 1]``."""
        return ((self.model.model.vqmodel.decode(codes).float() + 1) / 2).clamp(0, 1)

    def code_logits(self, prompt: Tensor, mask: Tensor, codes: Tensor) -> Tensor:
        """``(N, L, K)`` generation-head logits for each of ``codes`` ``(N, L)`` after the prompt (teacher forcing)."""
        L = codes.shape[1]
        inputs = torch.cat([prompt, self.code_embeds(codes[:, :-1])], 1)
        full_mask = torch.cat([mask, torch.ones_like(codes[:, :-1])], 1)
        core = self.core
        hidden = core.language_model(
            inputs_embeds=inputs, attention_mask=full_mask, position_ids=left_pad_positions(full_mask)
        ).last_hidden_state
        return core.generation_head(hidden[:, -L:]).float()

    def code_logprobs(
        self, prompt: Tensor, mask: Tensor, codes: Tensor, temperature: float = 1.0, unconditional: Tensor | None = None
    ) -> Tensor:
        """``(N, L)`` log-probs of ``codes`` at ``temperature`` (the policy a rollout sampled); with the
        ``unconditional`` prompt embeddings, of the guided logits ``u + guidance_scale · (c − u)``."""
        logits = self.code_logits(prompt, mask, codes)
        if unconditional is not None:
            u = self.code_logits(unconditional, mask, codes)
            logits = u + self.guidance_scale * (logits - u)
        logits = logits / temperature
        return logits.log_softmax(-1).gather(-1, codes.unsqueeze(-1)).squeeze(-1)

    # ---------------------------------------------------------------------------------------- interface

    @override
    def sft_loss(self, x: Tensor, z: list[str], y: Tensor) -> Tensor:
        """Mean negative log-likelihood of ``y``'s ``L`` codes over the batch; with ``unconditional_dropout``, that
        share of examples (in training) is scored after the unconditional prompt."""
        dropped = None
        if self.training and self.unconditional_dropout > 0:
            dropped = torch.rand(len(z)) < self.unconditional_dropout
        prompt, mask, _ = self.prompt_embeds(x, z, dropped)
        return -self.code_logprobs(prompt, mask, self.encode_images(y)).mean()

    @override
    @torch.no_grad()
    def sample(
        self,
        x: Tensor,
        z: list[str],
        num_samples: int = 1,
        greedy: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> Rollout:
        """``G = num_samples`` next states per ``(x, z)``, rows group-major, decoded code by code with a KV cache,
        as Janus's image ``generate`` loop (each prompt prefilled once, its cache repeated ``G`` times).

        ``temperature``, ``top_k``, ``top_p``: Janus's sampling (defaults: plain sampling at temperature 1). The old
        log-probs are the sampler's, over the whole codebook at ``temperature`` (greedy: at 1).
        """
        if greedy and num_samples != 1:
            raise ValueError(f"greedy decoding is deterministic: use num_samples=1, not {num_samples}")
        scored_temperature = 1.0 if greedy else temperature
        prompt, mask, plain = self.prompt_embeds(x, z)
        codes, old_logprobs = self.generate_codes(
            prompt, mask, num_samples, greedy, scored_temperature, top_k, top_p, unconditional=plain
        )
        context = {
            "x": _normalise(x).repeat_interleave(num_samples, 0),
            "z": [a for a in z for _ in range(num_samples)],
            "codes": codes,
        }
        return Rollout(
            group_size=num_samples,
            old_logprobs=old_logprobs,
            mask=torch.ones_like(old_logprobs, dtype=torch.bool),
            images=per_distinct_row(self.decode_codes, codes),
            context=context,
            temperature=scored_temperature,
        )

    @torch.no_grad()
    def generate_codes(
        self,
        prompt: Tensor,
        mask: Tensor,
        num_samples: int = 1,
        greedy: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        unconditional: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Janus's image loop from prompt embeddings ``(B, T, D)``: each step's generation-head logits give the next
        code (argmax, or a draw after temperature, top-k, top-p), whose generation embedding is the next input.
        ``unconditional``: the unconditional prompts' embeddings (same mask), run beside the prompts as one batch and
        mixed in as Janus's guidance. Returns codes and their log-probs at ``temperature`` over the codebook, both
        ``(B * num_samples, L)``."""
        warpers = [] if greedy else _warpers(top_k, top_p)
        core = self.core
        lm, head = core.language_model, core.generation_head
        n = prompt.shape[0] * num_samples
        if unconditional is not None:  # [conditional; unconditional] rows, as Janus's generate doubles its batch
            prompt, mask = torch.cat([prompt, unconditional]), torch.cat([mask, mask])
        positions = left_pad_positions(mask)
        out = lm(inputs_embeds=prompt, attention_mask=mask, position_ids=positions, use_cache=True)
        cache = _repeat_cache(out.cache, num_samples)  # each prompt prefilled once for its group
        hidden = out.last_hidden_state[:, -1].repeat_interleave(num_samples, 0)
        mask = mask.repeat_interleave(num_samples, 0)
        position = positions[:, -1:].repeat_interleave(num_samples, 0)
        codes, logprobs = [], []
        for step in range(self.num_image_tokens):
            logits = head(hidden).float()
            if unconditional is not None:
                c, u = logits[:n], logits[n:]
                logits = u + self.guidance_scale * (c - u)
            scaled = logits / temperature
            if greedy:
                code = scaled.argmax(-1)
            else:
                filtered = scaled
                for warp in warpers:
                    filtered = warp(None, filtered)
                code = torch.multinomial(filtered.softmax(-1), 1).squeeze(-1)
            codes.append(code)
            logprobs.append(scaled.log_softmax(-1).gather(-1, code[:, None]).squeeze(-1))
            if step + 1 == self.num_image_tokens:
                break
            mask, position = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), position + 1
            fed = code if unconditional is None else torch.cat([code, code])
            out = lm(
                inputs_embeds=self.code_embeds(fed[:, None]),
                attention_mask=mask,
                position_ids=position,
                cache=cache,
                use_cache=True,
            )
            cache, hidden = out.cache, out.last_hidden_state[:, -1]
        return torch.stack(codes, 1), torch.stack(logprobs, 1)

    @override
    def rollout_logprobs(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """Log-probs ``(N, L)`` of the rollout's codes under the current weights (with grad), and the mask."""
        ctx = rollout.context
        prompt, mask, plain = self.prompt_embeds(ctx["x"], ctx["z"])
        return self.code_logprobs(prompt, mask, ctx["codes"], rollout.temperature, plain), rollout.mask

    @override
    @torch.no_grad()
    def log_likelihood(self, x: Tensor, z: list[str], y: Tensor, group_size: int = 1) -> Tensor:
        """``(B,)`` exact mean per-code ``log P(y | x, z)`` (unguided)."""
        prompt, mask, _ = self.prompt_embeds(x, z)
        return self.code_logprobs(prompt, mask, self.encode_images(y)).mean(-1)

    @override
    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
        write_settings(path, {"image_size": self.image_size})

    @override
    @classmethod
    def from_pretrained(cls, path: str | Path) -> JanusFWM:
        return cls(str(path))


def _repeat_cache(cache: Any, group_size: int) -> Any:
    """A KV cache of ``B`` prompts as the cache of ``B * group_size`` rows, group-major."""
    if group_size > 1:
        cache.batch_repeat_interleave(group_size)
    return cache


def _warpers(top_k: int | None, top_p: float | None) -> list:
    warpers = []
    if top_k is not None and top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def janus_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer with Janus's named image tokens and chat roles."""
    specials = [IMAGE_TOKEN, BOI, EOI, USER, ASSISTANT]
    base = build_text_tokenizer(special_tokens=specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        pad_token=base.pad_token,
        bos_token=base.bos_token,
        eos_token=base.eos_token,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "boi_token": BOI, "eoi_token": EOI},
    )


def build_tiny_janus(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny, seeded Janus folder at ``path``: ``JanusForConditionalGeneration`` + ``JanusProcessor``.

    Understanding: a 2-layer SigLIP tower with 8-px patches (``(image_size / 8)²`` features per image). Generation:
    a VQ of 64 codes on a ``(image_size / 8)²`` grid. Language model: the other tiny VLMs' Llama. Returns
    ``path``.
    """
    tokenizer = janus_tokenizer()
    patch, side = 8, image_size // 8
    width = TINY_TEXT_SIZE["hidden_size"]
    vision = JanusVisionConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch,
        mlp_ratio=2.0,
        projection_dim=width,
        depth=2,
        num_image_tokens=side * side,
    )
    vq = JanusVQVAEConfig(
        embed_dim=8,
        num_embeddings=64,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1, 1, 1, 1],  # 3 downsamplings: 8 px per code
        num_res_blocks=1,
        num_patches=side,
        projection_dim=width,
        image_token_embed_dim=width,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=1024, **TINY_TEXT_SIZE, **special_token_ids(tokenizer)
    )
    config = JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    processor = JanusProcessor(
        image_processor=JanusImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        chat_template=JANUS_CHAT_TEMPLATE,
        num_image_tokens=side * side,
    )

    # Janus's image generate reads the image-start token from the generation config.
    return write_tiny_vlm(
        path, config, processor, seed, generation_kwargs={"boi_token_id": tokenizer.convert_tokens_to_ids(BOI)}
    )
