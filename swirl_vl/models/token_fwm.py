"""``TokenFWM``: the forward world model as a causal LM over text + VQ image tokens (Liquid / Emu3 / Chameleon-style).

Sequence layout of one example (a batch is left-padded, so ``y``'s codes always fill the last ``L`` positions):

    <|bos|> action text <|boi|> x_1 … x_L <|eoi|> <|boi|> y_1 … y_L
    └────────────────────── prompt ───────────────────────┘ └─ target ─┘

``x_i`` / ``y_i`` are image-code tokens ``<|img_k|>`` (``k`` = the VQ codebook index) in raster order over the
VQ's ``h × w`` grid, ``L = h*w``. The instruction comes first, as in text-to-image prompts, and puts ``y_i`` at
the same distance ``L + 2`` from ``x_i`` whatever the action's length: copying an unchanged cell is then one
fixed relative offset, which rotary attention learns from a few hundred pairs.
The policy over each target token is the softmax restricted to the ``K`` image-code tokens (every other logit
is ``-inf``); SFT, sampling, ``rollout_logprobs`` and ``log_likelihood`` all use this one restriction, so the
sampler's distribution and the scored one agree. No ``<|eoi|>`` is scored or generated after ``y``: an image
always has exactly ``L`` tokens.

A family may lay an image out with fixed tokens among its codes (``_image_layout``: Emu3 ends each row with a
row-end token): an image then takes ``S > L`` slots, the fixed tokens are generated with probability 1 and never
scored, and everything above holds for the ``L`` code slots.

Model folder: a transformers causal-LM folder (``config.json``, safetensors, tokenizer files) plus ``vq/``, a
diffusers ``VQModel`` folder (the image tokenizer, frozen).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
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
from swirl_vl.models.generation import (
    LogitGuidance,
    RecordLogprobs,
    generate_groups,
    head_rows,
    per_distinct_row,
    tail_logits,
)
from swirl_vl.models.image_tokenizer import ImageTokenizer, load_image_tokenizer, resize_square
from swirl_vl.models.text import build_text_tokenizer
from swirl_vl.models.vq import SHIPPED_SPRITE_VQ

BOI, EOI = "<|boi|>", "<|eoi|>"


def image_token(code: int) -> str:
    """The vocabulary entry of VQ code ``code``."""
    return f"<|img_{code}|>"


class RestrictToImageTokens(LogitsProcessor):
    """Sets every logit outside the image-code tokens to ``-inf`` (runs before temperature / top-p in ``generate``).

    ``layout`` (with ``prompt_length``, the width of the prompts): the image's token slots, ``-1`` where a code goes
    and a token id where the layout puts a fixed token (Emu3's row ends); at such a step that token is the only one
    left, so it is generated with probability 1.
    """

    def __init__(self, image_token_ids: Tensor, layout: Tensor | None = None, prompt_length: int = 0) -> None:
        self.image_token_ids = image_token_ids
        self.fixed = None if layout is None or (layout < 0).all() else layout.tolist()
        self.prompt_length = prompt_length

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        restricted = torch.full_like(scores, float("-inf"))
        step = input_ids.shape[1] - self.prompt_length
        if self.fixed is not None and step < len(self.fixed) and self.fixed[step] >= 0:
            restricted[:, self.fixed[step]] = scores[:, self.fixed[step]]
        else:
            restricted[:, self.image_token_ids] = scores[:, self.image_token_ids]
        return restricted


class TokenFWM(ForwardWorldModel):
    """``P_θ(y | x, z)`` as next-token prediction of ``y``'s VQ codes after ``x``'s codes and the action text."""

    def __init__(
        self,
        path: str,
        build_tiny: bool = False,
        seed: int = 0,
        vq_path: str | None = None,
        image_size: int | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        """
        Args:
            path: model folder (causal LM + tokenizer + ``vq/``).
            build_tiny: when ``path`` holds no model, write a tiny randomly initialised one there first.
            seed: initialisation seed of the tiny model.
            vq_path: image tokenizer folder; default ``<path>/vq``. The tiny builder copies it (default: the
                shipped sprite-world tokenizer) into ``<path>/vq``.
            image_size: side in pixels the VQ sees; other input sizes are resized to it. None: the size a
                ``save_pretrained`` folder was trained at, else ``default_image_size``.
            gradient_checkpointing: recompute the language model's activations in backward (less memory, ~30% more
                compute; rollouts are then scored as full copies of each prompt).
        """
        super().__init__()
        folder = Path(path)
        if not (folder / "config.json").is_file():
            if not build_tiny:
                raise self._missing(path)
            self._build_tiny(folder, seed=seed, vq_path=vq_path)
        self.settings = saved_settings(folder)
        self.image_size = (
            image_size if image_size is not None else self.settings.get("image_size", self.default_image_size)
        )
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.lm = self._load_lm(folder)
        self.vq = self._load_image_tokenizer(folder, vq_path)
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.lm)
        self.grid = self.vq.grid(self.image_size)
        self.num_image_tokens = self.grid[0] * self.grid[1]

        num_codes = self.vq.num_codes
        code_ids, self.boi_id, self.eoi_id = self._vocabulary(num_codes, path)
        # Some real tokenizers have no BOS or no pad token: start without one, pad with EOS (always masked out).
        self._bos = [] if self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id]
        self.pad_id = next(i for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0) if i is not None)
        # code k ↔ token id; token_to_code maps every non-image token to -1.
        self.register_buffer("code_token_ids", torch.tensor(code_ids), persistent=False)
        vocab = max(len(self.tokenizer), self.lm.get_output_embeddings().out_features)  # real heads are often padded
        if max(code_ids) >= self.lm.get_output_embeddings().out_features:
            raise ValueError(
                f"the language model at '{path}' has {self.lm.get_output_embeddings().out_features} output rows, "
                f"too few for image code token {max(code_ids)}"
            )
        token_to_code = torch.full((vocab,), -1, dtype=torch.long)
        token_to_code[self.code_token_ids] = torch.arange(num_codes)
        self.register_buffer("token_to_code", token_to_code, persistent=False)
        # An image's S token slots in a sequence: -1 where a code goes, else the fixed token the layout puts there.
        layout = torch.tensor(self._image_layout(), dtype=torch.long)
        self.register_buffer("image_layout", layout, persistent=False)
        self.register_buffer("code_slots", (layout < 0).nonzero().squeeze(1), persistent=False)
        self.image_length = len(layout)

    # ---------------------------------------------------------------------------------------- the folder format
    folder_format = "token-model"
    """The folder format's name in messages; its FWM and its IDM read the same format (``TokenIDM.fwm_class``)."""

    # Overridden by each model family (``LiquidFWM``): where the image codes sit in the vocabulary, the prompt.

    @classmethod
    def preflight(cls, init_args: Mapping[str, Any], stage: str) -> list[str]:
        """What ``cls(**init_args)`` would find missing, checked without loading anything (the CLI asks first): the
        model folder (unless the tiny builder will write it) and a ``vq_path`` that is not a local folder."""
        found = []
        path, vq_path = Path(init_args["path"]), init_args.get("vq_path")
        if not (path / "config.json").is_file() and not init_args.get("build_tiny"):
            found.append(str(cls._missing(path)))
        if vq_path is not None and not (Path(vq_path) / "config.json").is_file():
            found.append(f"image tokenizer not found at vq_path '{vq_path}' (a local folder with config.json)")
        return found

    @classmethod
    def _missing(cls, path: str | Path) -> FileNotFoundError:
        return missing_checkpoint_error(path, f"{cls.folder_format} checkpoint", cls._download_hint())

    @classmethod
    def _download_hint(cls) -> str:
        return (
            "Download a causal LM whose vocabulary holds the image-code tokens "
            f"'{image_token(0)}'… plus '{BOI}'/'{EOI}', with its image tokenizer in a 'vq/' subfolder, "
            "or set build_tiny: true to write a tiny randomly initialised model there."
        )

    def _build_tiny(self, folder: Path, seed: int, vq_path: str | None) -> None:
        build_tiny_token_fwm(folder, seed=seed, vq_path=vq_path)

    def _load_lm(self, folder: Path) -> nn.Module:
        """The folder's language model, by its own library class."""
        return AutoModelForCausalLM.from_pretrained(folder)

    def _image_layout(self) -> list[int]:
        """An image's token slots in raster order, ``-1`` for a code and a token id for a fixed token: here the
        ``L`` codes alone (Emu3 ends every row with a fixed token)."""
        return [-1] * self.num_image_tokens

    def _load_image_tokenizer(self, folder: Path, vq_path: str | None) -> ImageTokenizer:
        """The frozen image tokenizer: ``vq_path``, default ``<folder>/vq``."""
        return load_image_tokenizer(vq_path or folder / "vq")

    vq_in_lm: bool = False
    """Whether the image tokenizer is a part of the language model's folder (then not written to ``vq/``)."""

    def _vocabulary(self, num_codes: int, path: str) -> tuple[list[int], int, int]:
        """Token ids of codes ``0 … K-1``, of begin-image and of end-image: here named ``<|img_k|>`` tokens."""
        ids = self.tokenizer.convert_tokens_to_ids([image_token(k) for k in range(num_codes)] + [BOI, EOI])
        if any(i is None or i == self.tokenizer.unk_token_id for i in ids):
            raise ValueError(
                f"the tokenizer at '{path}' lacks image tokens: it needs '{image_token(0)}'…"
                f"'{image_token(num_codes - 1)}' (one per VQ code), '{BOI}' and '{EOI}'"
            )
        return ids[:-2], ids[-2], ids[-1]

    default_image_size = 32
    """The image side of a folder without saved settings (the shipped sprite VQ's)."""

    unconditional_dropout: float = 0.0
    """Share of SFT examples trained after the unconditional prompt, so that guidance has a trained unconditional
    branch (families with an unconditional prompt take it as an argument)."""

    guidance_scale: float = 1.0
    """Classifier-free guidance on the logits when sampling (1: none); families with an unconditional prompt
    (``_unconditional_rows``) take it as an argument."""

    def _set_guidance(self, guidance_scale: float, unconditional_dropout: float) -> None:
        """Checked ``guidance_scale`` and ``unconditional_dropout`` (for families with an unconditional prompt)."""
        if not 0 <= unconditional_dropout <= 1:
            raise ValueError(f"unconditional_dropout must be in [0, 1]; got {unconditional_dropout}")
        self.guidance_scale, self.unconditional_dropout = guidance_scale, unconditional_dropout

    def _unconditional_rows(self, x_tokens: list[list[int]]) -> list[list[int]]:
        raise NotImplementedError(f"{type(self).__name__} has no unconditional prompt: keep guidance_scale 1")

    def _prompt_rows(self, x_tokens: list[list[int]], z: list[str]) -> list[list[int]]:
        """Token ids of each prompt, ending with begin-image (``y``'s codes follow): ``<bos> z <boi> x <eoi> <boi>``."""
        texts = self.tokenizer(list(z), add_special_tokens=False)["input_ids"]
        return [[*self._bos, *text, self.boi_id, *xt, self.eoi_id, self.boi_id] for xt, text in zip(x_tokens, texts)]

    @property
    def device(self) -> torch.device:
        return self.code_token_ids.device

    # ---------------------------------------------------------------------------------------- sequences

    def encode_images(self, images: Tensor, group_size: int = 1) -> Tensor:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` → VQ codes ``(B, L)``; resized to ``image_size`` first if needed.

        ``group_size``: when the rows come in blocks of ``group_size`` copies of one image (a Phase II group), each
        image is encoded once.
        """
        if group_size > 1 and images.shape[0] % group_size == 0:
            firsts = images[::group_size]
            if torch.equal(firsts.repeat_interleave(group_size, 0), images):
                return self.encode_images(firsts).repeat_interleave(group_size, 0)
        return self.vq.encode(resize_square(images.to(self.device), self.image_size))

    def decode_codes(self, codes: Tensor) -> Tensor:
        """VQ codes ``(N, L)`` → images ``(N, 3, image_size, image_size)`` in ``[0, 1]``."""
        return self.vq.decode(codes, self.grid)

    def image_token_ids(self, codes: Tensor) -> Tensor:
        """VQ codes ``(B, L)`` → the image's tokens ``(B, S)`` in the sequence: code tokens in the layout's slots."""
        tokens = self.code_token_ids[codes]
        if self.image_length == codes.shape[1]:
            return tokens
        slots = self.image_layout.expand(codes.shape[0], -1).clone()
        slots[:, self.code_slots] = tokens
        return slots

    def image_codes(self, tokens: Tensor) -> Tensor:
        """An image's tokens ``(N, S)`` (the last ``S`` of a sequence) → its VQ codes ``(N, L)``."""
        if self.image_length != self.num_image_tokens:
            tokens = tokens[:, self.code_slots]
        return self.token_to_code[tokens]

    def prompt_ids(
        self, x: Tensor, z: list[str], group_size: int = 1, unconditional: list[bool] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Left-padded prompts (``_prompt_rows``): ids and attention mask, both ``(B, T)``. ``unconditional``: rows
        that get the prompt without the action instead (``_unconditional_rows``; SFT's guidance dropout)."""
        if len(z) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} images but {len(z)} actions")
        x_tokens = self.image_token_ids(self.encode_images(x, group_size)).tolist()
        rows = self._prompt_rows(x_tokens, z)
        if unconditional is not None and any(unconditional):
            plain = self._unconditional_rows(x_tokens)
            rows = [u if drop else c for c, u, drop in zip(rows, plain, unconditional)]
        return self._left_padded(rows)

    def unconditional_prompt_ids(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Left-padded prompts without the action (``_unconditional_rows``), for classifier-free guidance."""
        return self._left_padded(self._unconditional_rows(self.image_token_ids(self.encode_images(x)).tolist()))

    def _left_padded(self, rows: list[list[int]]) -> tuple[Tensor, Tensor]:
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def pair_ids(
        self, x: Tensor, z: list[str], y: Tensor, group_size: int = 1, unconditional: list[bool] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Prompt followed by ``y``'s image tokens: ids and attention mask ``(B, T + S)``."""
        ids, mask = self.prompt_ids(x, z, group_size, unconditional)
        y_tokens = self.image_token_ids(self.encode_images(y, group_size))  # (B, S)
        return torch.cat([ids, y_tokens], 1), torch.cat([mask, torch.ones_like(y_tokens)], 1)

    def code_logprobs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        temperature: float = 1.0,
        group_size: int = 1,
        unconditional: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """``(N, L)`` log-probs, under the policy restricted to image codes, of the ``L`` codes among the last ``S``
        tokens of each row (the image's slots; a fixed token has probability 1 and is not scored).

        ``temperature``: the logits are divided by it first (a rollout's sampling temperature; 1 for likelihoods).
        ``group_size``: rows come in groups that share their prompt (a rollout); it then runs once per group.
        ``unconditional``: the same tails after the unconditional prompts: the logits are then guided,
        ``u + guidance_scale · (c − u)``, as ``sample`` drew them.
        """
        S = self.image_length
        # Only the tail is scored, at the positions generate() uses, and the head computes the K code rows only
        # (a real model's 264k-word head would otherwise dominate the memory of scoring 1,024 positions).
        with head_rows(self.lm, self.code_token_ids):
            logits = tail_logits(self.lm, {"input_ids": input_ids, "attention_mask": attention_mask}, S, group_size)
            logits = logits.float()  # (N, S, K): t predicts t + 1
            if unconditional is not None:
                u = tail_logits(self.lm, unconditional, S, group_size).float()
                logits = u + self.guidance_scale * (logits - u)
        if S != self.num_image_tokens:
            logits = logits[:, self.code_slots]  # (N, L, K)
        logits = logits / temperature
        targets = self.image_codes(input_ids[:, -S:])  # (N, L)
        return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    # ---------------------------------------------------------------------------------------- interface

    @override
    def sft_loss(self, x: Tensor, z: list[str], y: Tensor) -> Tensor:
        """Mean negative log-likelihood of ``y``'s ``L`` code tokens (restricted policy), over the batch; with
        ``unconditional_dropout``, that share of examples (in training) is scored after the unconditional prompt."""
        unconditional = None
        if self.training and self.unconditional_dropout > 0:
            unconditional = (torch.rand(len(z)) < self.unconditional_dropout).tolist()
        return -self.code_logprobs(*self.pair_ids(x, z, y, unconditional=unconditional)).mean()

    @override
    @torch.no_grad()
    def sample(
        self,
        x: Tensor,
        z: list[str],
        num_samples: int = 1,
        greedy: bool = False,
        temperature: float = 0.75,
        top_p: float = 0.96,
        top_k: int | None = 50,
    ) -> Rollout:
        """``G = num_samples`` next states per ``(x, z)``, rows group-major (row ``b*G + g``), in one ``generate`` that
        prefills each prompt once.

        ``top_k``: the codes kept before ``top_p``; 50 is what ``generate`` applies when none is given (transformers
        5 fills an unset ``top_k`` with its default), made explicit here; 0 or None samples from every code.

        Returns images ``(B*G, 3, H, W)`` in ``[0, 1]``, ``old_logprobs`` / ``mask`` ``(B*G, L)`` (at ``temperature``)
        and ``context = {"input_ids", "attention_mask"}`` ``(B*G, T + S)``. ``greedy`` takes the argmax (``G = 1``;
        scored at temperature 1). Old log-probs are the sampler's own, equal to ``rollout_logprobs`` up to float error.
        """
        if greedy and num_samples != 1:
            raise ValueError(f"greedy decoding is deterministic: use num_samples=1, not {num_samples}")
        ids, mask = self.prompt_ids(x, z)
        S = self.image_length
        sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p}
        config = GenerationConfig(
            max_new_tokens=S,
            min_new_tokens=S,
            top_k=None if greedy else top_k or 0,  # applied within the image codes (after the restriction)
            pad_token_id=self.pad_id,
            eos_token_id=None,  # an image is exactly S tokens; nothing may end it early
            use_cache=True,
            **sampling,
        )
        scored_temperature = 1.0 if greedy else temperature
        recorder = RecordLogprobs(scored_temperature)  # after the restriction: log-probs over the image codes
        processors = [RestrictToImageTokens(self.code_token_ids, self.image_layout, ids.shape[1]), recorder]
        if self.guidance_scale != 1:
            u_ids, u_mask = self.unconditional_prompt_ids(x)
            unconditional = {"input_ids": u_ids, "attention_mask": u_mask}
            processors.insert(0, LogitGuidance(self.lm, unconditional, self.guidance_scale, num_samples))
        sequences = generate_groups(
            self.lm,
            {"input_ids": ids, "attention_mask": mask},
            num_samples,
            generation_config=config,
            logits_processor=LogitsProcessorList(processors),
        )  # (N, T + S)
        mask = mask.repeat_interleave(num_samples, 0)
        full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], S)], 1)
        images = per_distinct_row(self.decode_codes, self.image_codes(sequences[:, -S:]))
        context = {"input_ids": sequences, "attention_mask": full_mask}
        if self.guidance_scale != 1:  # the unconditional prompts followed by the same sampled codes
            u_mask = u_mask.repeat_interleave(num_samples, 0)
            context["unconditional_input_ids"] = torch.cat(
                [u_ids.repeat_interleave(num_samples, 0), sequences[:, -S:]], 1
            )
            context["unconditional_attention_mask"] = torch.cat([u_mask, u_mask.new_ones(u_mask.shape[0], S)], 1)
        # The sampler's own log-probs, recorded during generate (no second forward pass), at the code slots.
        old_logprobs = recorder.finish(sequences)
        if S != self.num_image_tokens:
            old_logprobs = old_logprobs[:, self.code_slots]
        return Rollout(
            group_size=num_samples,
            old_logprobs=old_logprobs,
            mask=torch.ones_like(old_logprobs, dtype=torch.bool),
            images=images,
            context=context,
            temperature=scored_temperature,
        )

    @override
    def rollout_logprobs(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """Log-probs ``(N, L)`` of the rollout's code tokens under the current weights (with grad), and the mask."""
        ctx = rollout.context
        unconditional = None
        if "unconditional_input_ids" in ctx:
            unconditional = {
                "input_ids": ctx["unconditional_input_ids"],
                "attention_mask": ctx["unconditional_attention_mask"],
            }
        logp = self.code_logprobs(
            ctx["input_ids"], ctx["attention_mask"], rollout.temperature, rollout.group_size, unconditional
        )
        return logp, rollout.mask

    @override
    @torch.no_grad()
    def log_likelihood(self, x: Tensor, z: list[str], y: Tensor, group_size: int = 1) -> Tensor:
        """``(B,)`` exact mean per-token ``log P(y | x, z)`` over ``y``'s codes (no random draws; a group's shared
        ``x`` and ``y`` are VQ-encoded once)."""
        return self.code_logprobs(*self.pair_ids(x, z, y, group_size)).mean(-1)

    @override
    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.lm.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if not self.vq_in_lm:
            self.vq.save_pretrained(path / "vq")
        write_settings(path, self._settings())

    def _settings(self) -> dict[str, Any]:
        """What ``save_pretrained`` records for reloading (``swirl_vl.json``)."""
        return {"image_size": self.image_size}

    @override
    @classmethod
    def from_pretrained(cls, path: str | Path) -> TokenFWM:
        return cls(str(path))


def build_tiny_token_fwm(path: str | Path, seed: int = 0, vq_path: str | Path | None = None) -> Path:
    """Write a tiny, seeded ``LlamaForCausalLM`` TokenFWM folder at ``path`` (a no-op if another process won).

    Vocabulary: the local byte-level BPE text tokenizer + ``<|boi|> <|eoi|>`` + one ``<|img_k|>`` per VQ code.
    LM: 4 layers of width 128, 4 heads (~0.9 M parameters). ``path/vq`` is a copy of ``vq_path`` (default: the
    shipped sprite-world tokenizer). Built in a temporary sibling folder and renamed into place, so a crash
    leaves nothing half-written and concurrent ranks building the same path are safe. Returns ``path``.
    """
    path = Path(path)
    vq_source = Path(vq_path) if vq_path is not None else SHIPPED_SPRITE_VQ
    num_codes = load_image_tokenizer(vq_source).num_codes
    specials = [BOI, EOI, *(image_token(k) for k in range(num_codes))]
    # vocab_size counts the special tokens: grow it with them so the text merges match the IDM's tokenizer.
    tokenizer = build_text_tokenizer(special_tokens=specials, vocab_size=512 + len(specials))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return write_tiny_lm_folder(path, LlamaForCausalLM, config, tokenizer, seed, vq_source)


def write_tiny_lm_folder(
    path: Path, model_class: type, config: Any, tokenizer: Any, seed: int, vq_source: Path | None
) -> Path:
    """Build ``model_class(config)`` under ``seed`` and write it with ``tokenizer`` (or processor) and a copy of the
    image tokenizer ``vq_source`` in ``vq/`` (None: no ``vq/``) to ``path``, atomically (the tiny token-model
    builders' shared last step)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    text = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id
    )

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if vq_source is not None:
            shutil.copytree(vq_source, tmp / "vq")

    return write_folder_atomically(path, write)
