"""Liquid (Wu et al. 2024), the paper's own world model: a Gemma causal LM whose vocabulary is extended by the
image codes of Chameleon's VQGAN, placed right after the text vocabulary (token id = ``len(tokenizer) + code``).

``LiquidFWM`` reads a Liquid folder as published (``Junfeng5/Liquid_V1_7B``: ``config.json``, safetensors, the
Gemma tokenizer with ``<boi>``, ``<eoi>``, ``<unconditional>``) through ``AutoModelForCausalLM`` /
``AutoTokenizer``, and its image tokenizer from ``vq_path`` (default ``<path>/vq``): Chameleon's VQGAN converted to
a diffusers ``VQModel`` folder (``python -m swirl_vl.models.chameleon_vqgan``). The prompt is the paper's code's
(``src/inferencer.py``, ``_generate_liquid_ti2i``), one fixed instruction instead of a random one of ten so that
likelihoods are deterministic:

    <bos> <boi> x_1 … x_L <eoi> \\n {instruction} {action} <boi> y_1 … y_L
    └────────────────────────── prompt ─────────────────────────┘ └─ target ─┘

Image tokens are sampled restricted to the image codes at temperature 0.75, top-p 0.96, top-k 4096, as the
paper's code samples them; the policy that SFT, GRPO and the Phase II reward score is that same restriction (the
paper's reward scores ``y`` and ``<eoi>`` under the full vocabulary; here the sampler and every score agree).

``build_tiny_liquid`` writes the same layout at a few MB: a 4-layer Gemma, a Gemma tokenizer (byte-fallback BPE
trained on a seed corpus) and an image tokenizer in ``vq/`` (default: the shipped sprite-world VQ).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import GemmaConfig, GemmaForCausalLM, GemmaTokenizer
from typing_extensions import override

from swirl_vl.models.base import InverseDynamicsModel, Rollout, saved_settings
from swirl_vl.models.chameleon_vqgan import VQGAN_DOWNLOAD
from swirl_vl.models.image_tokenizer import load_image_tokenizer
from swirl_vl.models.text import byte_fallback_bpe
from swirl_vl.models.token_fwm import TokenFWM, write_tiny_lm_folder
from swirl_vl.models.token_idm import TokenIDM
from swirl_vl.models.vq import SHIPPED_SPRITE_VQ

LIQUID_BOI, LIQUID_EOI, UNCONDITIONAL = "<boi>", "<eoi>", "<unconditional>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
FWM_INSTRUCTION = "Modify the provided image based on the given instruction:"


class LiquidFWM(TokenFWM):
    """``P_θ(y | x, z)`` on a Liquid folder: ``y``'s Chameleon-VQGAN codes after ``x``'s and the instruction."""

    folder_format = "Liquid"

    def __init__(
        self,
        path: str,
        build_tiny: bool = False,
        seed: int = 0,
        vq_path: str | None = None,
        image_size: int | None = None,
        instruction: str | None = None,
        guidance_scale: float = 1.0,
        unconditional_dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        """
        Args:
            path: Liquid folder (Gemma causal LM + tokenizer; ``vq/`` unless ``vq_path``).
            build_tiny: when ``path`` holds no model, write a tiny randomly initialised one there first.
            seed: initialisation seed of the tiny model.
            vq_path: image tokenizer folder (Chameleon's VQGAN as a diffusers ``VQModel``); default ``<path>/vq``.
            image_size: side in pixels the VQ sees (Liquid: 512, so 32 × 32 = 1,024 codes); inputs are resized.
                None: the size a ``save_pretrained`` folder was trained at, else 512.
            instruction: the editing instruction put before the action; None: a saved folder's, else the first of
                the paper's ten.
            guidance_scale: classifier-free guidance on the logits when sampling, against the prompt
                ``<boi> x <eoi> \\n <unconditional> <boi>`` (the paper's code: ``cfg_scale``); 1 samples unguided.
                GRPO then scores the guided policy it sampled; likelihoods (SFT, the Phase II reward) stay unguided.
            unconditional_dropout: share of SFT examples trained after the unconditional prompt instead (keeps the
                branch that guidance subtracts trained; 0 by default).
            gradient_checkpointing: recompute the language model's activations in backward.
        """
        saved = saved_settings(path)
        self.instruction = instruction if instruction is not None else saved.get("edit_instruction", FWM_INSTRUCTION)
        self._set_guidance(guidance_scale, unconditional_dropout)
        super().__init__(path, build_tiny, seed, vq_path, image_size, gradient_checkpointing)

    default_image_size = 512

    @override
    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "edit_instruction": self.instruction}

    @classmethod
    def _download_hint(cls) -> str:
        return f"Download Liquid (`hf download Junfeng5/Liquid_V1_7B --local-dir PATH`) and {VQGAN_DOWNLOAD}"

    @override
    def _build_tiny(self, folder: Path, seed: int, vq_path: str | None) -> None:
        build_tiny_liquid(folder, seed=seed, vq_path=vq_path)

    @override
    def _vocabulary(self, num_codes: int, path: str) -> tuple[list[int], int, int]:
        """Codes follow the text vocabulary (id = ``len(tokenizer) + k``); ``<boi>`` / ``<eoi>`` are text tokens."""
        offset = len(self.tokenizer)
        boi, eoi = self.tokenizer.convert_tokens_to_ids([LIQUID_BOI, LIQUID_EOI])
        if None in (boi, eoi) or self.tokenizer.unk_token_id in (boi, eoi):
            raise ValueError(f"the tokenizer at '{path}' lacks Liquid's '{LIQUID_BOI}' / '{LIQUID_EOI}' tokens")
        return list(range(offset, offset + num_codes)), boi, eoi

    @override
    def _prompt_rows(self, x_tokens: list[list[int]], z: list[str]) -> list[list[int]]:
        """``<bos> <boi> x <eoi> \\n {instruction} {z} <boi>``; the text after ``x`` is tokenized as one string, as
        the paper's ``tokenizer_image_token`` does."""
        tails = [f"{LIQUID_EOI}\n{self.instruction} {action}{LIQUID_BOI}" for action in z]
        tail_ids = self.tokenizer(tails, add_special_tokens=False)["input_ids"]
        return [[*self._bos, self.boi_id, *xt, *tail] for xt, tail in zip(x_tokens, tail_ids)]

    @override
    def _unconditional_rows(self, x_tokens: list[list[int]]) -> list[list[int]]:
        """``<bos> <boi> x <eoi> \\n <unconditional> <boi>``, as the paper's code guides edits."""
        tail = self.tokenizer(f"{LIQUID_EOI}\n{UNCONDITIONAL}{LIQUID_BOI}", add_special_tokens=False)["input_ids"]
        return [[*self._bos, self.boi_id, *xt, *tail] for xt in x_tokens]

    @override
    def sample(
        self,
        x: torch.Tensor,
        z: list[str],
        num_samples: int = 1,
        greedy: bool = False,
        temperature: float = 0.75,
        top_p: float = 0.96,
        top_k: int | None = 4096,
    ) -> Rollout:
        """As ``TokenFWM.sample``, with the paper's sampling for Liquid (temperature 0.75, top-p 0.96, top-k 4096)."""
        return super().sample(x, z, num_samples, greedy, temperature, top_p, top_k)


def build_liquid_tokenizer(vocab_size: int = 700) -> GemmaTokenizer:
    """A tiny Gemma tokenizer (BPE with byte fallback, ``▁`` for spaces, as Gemma's) with Liquid's special tokens.

    Deterministic: the same ``vocab_size`` gives the same vocabulary.
    """
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", START_OF_TURN, END_OF_TURN]
    specials += [LIQUID_BOI, LIQUID_EOI, UNCONDITIONAL]
    vocab, merges = byte_fallback_bpe(specials, vocab_size)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[5:]})  # already in the vocabulary
    return tokenizer


def build_tiny_liquid(path: str | Path, seed: int = 0, vq_path: str | Path | None = None) -> Path:
    """Write a tiny, seeded Liquid folder at ``path``: ``GemmaForCausalLM`` + Gemma tokenizer + ``vq/``.

    Vocabulary: the text tokenizer's, then one row per image code. LM: 4 layers of width 128, 4 query heads and
    one key/value head (Gemma's multi-query attention). Built in a temporary sibling folder and renamed into
    place (atomic; concurrent ranks building the same path are safe). Returns ``path``.
    """
    path = Path(path)
    vq_source = Path(vq_path) if vq_path is not None else SHIPPED_SPRITE_VQ
    num_codes = load_image_tokenizer(vq_source).num_codes
    tokenizer = build_liquid_tokenizer()
    config = GemmaConfig(
        vocab_size=len(tokenizer) + num_codes,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return write_tiny_lm_folder(path, GemmaForCausalLM, config, tokenizer, seed, vq_source)


IDM_INSTRUCTION = (
    "Given two consecutive images, identify and briefly describe the action that most likely caused the change "
    "from the first to the second. Use clear, concise natural language to explain the state transition."
)


class LiquidIDM(TokenIDM):
    """``Q_φ(z | x, y)`` on a Liquid folder: the paper's image-to-text prompt, Gemma's chat turns.

        <bos> <start_of_turn>user\\n <boi> x <eoi> <boi> y <eoi> \\n {instruction} <end_of_turn>\\n
        <start_of_turn>model\\n   action <end_of_turn>

    The pieces between the images are tokenized as the paper's ``tokenizer_image_token`` splits them; an action
    ends with ``<end_of_turn>`` (sampling also stops at ``<eos>``). ``LiquidIDM.sharing(fwm)`` serves both roles
    with one Liquid model, as the paper's all-Liquid setting does.
    """

    fwm_class = LiquidFWM

    def __init__(
        self,
        path: str,
        build_tiny: bool = False,
        seed: int = 0,
        vq_path: str | None = None,
        image_size: int | None = None,
        instruction: str | None = None,
        max_new_tokens: int = 24,
        gradient_checkpointing: bool = False,
    ) -> None:
        """
        Args:
            path: Liquid folder (as ``LiquidFWM``).
            build_tiny: when ``path`` holds no model, write a tiny randomly initialised one there first.
            seed: initialisation seed of the tiny model.
            vq_path: image tokenizer folder; default ``<path>/vq``.
            image_size: side in pixels the VQ sees (None: a saved folder's, else Liquid's 512).
            instruction: the question after the two images; None: a saved folder's, else the first of the paper's
                ten.
            max_new_tokens: default cap on the length of sampled actions, in tokens.
            gradient_checkpointing: recompute the language model's activations in backward.
        """
        saved = saved_settings(path)
        self.instruction = instruction if instruction is not None else saved.get("idm_instruction", IDM_INSTRUCTION)
        super().__init__(path, build_tiny, seed, vq_path, image_size, max_new_tokens, gradient_checkpointing)

    def _settings(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "idm_instruction": self.instruction}

    @classmethod
    def sharing(cls, fwm: TokenFWM, max_new_tokens: int = 24, instruction: str = IDM_INSTRUCTION) -> LiquidIDM:
        """An IDM on ``fwm``'s own Liquid model, tokenizer and VQ (same tensors)."""
        if not isinstance(fwm, LiquidFWM):
            raise TypeError(f"LiquidIDM shares a LiquidFWM's model, not a {type(fwm).__name__}")
        idm = cls.__new__(cls)
        idm.instruction = instruction
        InverseDynamicsModel.__init__(idm)
        idm._adopt(fwm, max_new_tokens)
        return idm

    @override
    def _answer_end_id(self) -> int | None:
        return self.tokenizer.convert_tokens_to_ids(END_OF_TURN)

    @override
    def _prompt_pieces(self) -> tuple[list[int], list[int], list[int]]:
        text = f"{START_OF_TURN}user\n{LIQUID_BOI}<image>{LIQUID_EOI}{LIQUID_BOI}<image>{LIQUID_EOI}\n"
        text += f"{self.instruction}{END_OF_TURN}\n{START_OF_TURN}model\n"
        before, between, after = (
            self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in text.split("<image>")
        )
        return [*self._bos, *before], between, after
