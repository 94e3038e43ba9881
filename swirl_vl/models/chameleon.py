"""Chameleon / Anole as a token world model: transformers' Chameleon format, read by its own classes.

A Chameleon folder (``facebook/chameleon-7b``; Anole, the fine-tune of it that generates images, as
``leloy/Anole-7b-v0.1-hf``) is ``ChameleonForConditionalGeneration``: ``config.json`` with the tokenizer's
``vocabulary_map``, safetensors, the tokenizer. Its 8,192 image codes are BPE tokens named ``IMGIMG…Z`` (the code's
digits as the letters A–J), placed where the vocabulary puts them; code ↔ token id comes from the config's
vocabulary map, as transformers' ``ChameleonImageVocabularyMapping`` reads it. An image sits between
``<racm3:break>`` and ``<eoss>`` (the processor's begin- and end-image tokens). ``ChameleonFWM`` prompts

    <s> {action} <racm3:break> x_1 … x_L <eoss> <racm3:break> y_1 … y_L

and samples and scores ``y``'s codes restricted to the image tokens.

Two things differ from the library's own path, each for a stated reason:

- ``ChameleonForConditionalGeneration.forward`` sets every image-token logit to the dtype minimum (Chameleon's
  release generates no images). ``ChameleonImageGeneration`` is that class with the logits left as the model
  computes them: loaded by the class's own ``from_pretrained`` from the same folder, saved back as
  ``ChameleonForConditionalGeneration``.
- transformers' ``ChameleonVQVAE`` (the folder's ``model.vqmodel``) holds the VQGAN's encoder only and cannot decode
  generated codes. The image tokenizer is Chameleon's VQGAN converted to a diffusers ``VQModel`` (``vq_path``, default
  ``<path>/vq``; ``python -m swirl_vl.models.chameleon_vqgan``), as for Liquid. The folder's own encoder is frozen and
  unused.

``build_tiny_chameleon`` writes the layout at a few MB: a 4-layer Chameleon, a Llama tokenizer (BPE with byte
fallback) whose vocabulary holds one ``IMGIMG…Z`` token per code of the image tokenizer in ``vq/`` (default: the
shipped sprite-world VQ), and a tiny random ``ChameleonVQVAE`` encoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import ChameleonConfig, ChameleonForConditionalGeneration, LlamaTokenizer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping
from typing_extensions import override

from swirl_vl.models.chameleon_vqgan import VQGAN_DOWNLOAD
from swirl_vl.models.image_tokenizer import load_image_tokenizer
from swirl_vl.models.text import byte_fallback_bpe
from swirl_vl.models.token_fwm import TokenFWM, write_tiny_lm_folder
from swirl_vl.models.token_idm import TokenIDM
from swirl_vl.models.vq import SHIPPED_SPRITE_VQ

CHAMELEON_BOI, CHAMELEON_EOI, CHAMELEON_IMAGE = "<racm3:break>", "<eoss>", "<image>"


def image_token_name(code: int) -> str:
    """Chameleon's BPE name of image code ``code``: ``IMGIMG`` + its digits as the letters A–J + ``Z``."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


class ChameleonImageGeneration(ChameleonForConditionalGeneration):
    """``ChameleonForConditionalGeneration`` whose forward keeps the image-token logits (the library's sets them to
    the dtype minimum, so that Chameleon generates no image); saved as ``ChameleonForConditionalGeneration``."""

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        kwargs.pop("labels", None)  # SFT computes its own loss over the image codes
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs[0], logits_to_keep))
        return CausalLMOutputWithPast(logits=logits, cache=outputs.cache)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        super().save_pretrained(save_directory, **kwargs)  # names this class in config.json: name the library's
        config = Path(save_directory) / "config.json"
        saved = json.loads(config.read_text())
        saved["architectures"] = ["ChameleonForConditionalGeneration"]
        config.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


class ChameleonFWM(TokenFWM):
    """``P_θ(y | x, z)`` on a Chameleon / Anole folder: ``y``'s VQGAN codes as image tokens after the action and ``x``."""

    folder_format = "Chameleon"

    default_image_size = 512

    @classmethod
    def _download_hint(cls) -> str:
        return f"Download Anole (`hf download leloy/Anole-7b-v0.1-hf --local-dir PATH`) and {VQGAN_DOWNLOAD}"

    @override
    def _build_tiny(self, folder: Path, seed: int, vq_path: str | None) -> None:
        build_tiny_chameleon(folder, seed=seed, vq_path=vq_path)

    @override
    def _load_lm(self, folder: Path) -> nn.Module:
        lm = ChameleonImageGeneration.from_pretrained(folder)
        lm.model.vqmodel.requires_grad_(False)  # the folder's VQGAN encoder: frozen, unused (codes come from vq/)
        return lm

    @override
    def _vocabulary(self, num_codes: int, path: str) -> tuple[list[int], int, int]:
        """Code ``k`` is the token the config's vocabulary map names ``IMGIMG…Z`` for ``k``."""
        mapping = ChameleonImageVocabularyMapping(self.lm.config.vocabulary_map)
        missing = [k for k in range(num_codes) if k not in mapping.img2bpe]
        if missing:
            raise ValueError(
                f"the vocabulary map at '{path}' has no image token for codes {missing[:5]} of the image tokenizer's "
                f"{num_codes} (e.g. '{image_token_name(missing[0])}')"
            )
        boi, eoi = (self.lm.config.vocabulary_map.get(t) for t in (CHAMELEON_BOI, CHAMELEON_EOI))
        if boi is None or eoi is None:
            raise ValueError(f"the vocabulary map at '{path}' lacks '{CHAMELEON_BOI}' / '{CHAMELEON_EOI}'")
        return [mapping.img2bpe[k] for k in range(num_codes)], boi, eoi


def build_chameleon_tokenizer(num_codes: int, vocab_size: int = 600) -> LlamaTokenizer:
    """A tiny Llama tokenizer (BPE with byte fallback, as Chameleon's) with Chameleon's special tokens and one
    ``IMGIMG…Z`` token per image code. Deterministic."""
    specials = ["<unk>", "<s>", "</s>", "<pad>", CHAMELEON_BOI, CHAMELEON_EOI, CHAMELEON_IMAGE]
    vocab, merges = byte_fallback_bpe(specials, vocab_size)
    for k in range(num_codes):  # image tokens after the text vocabulary, each a whole token of its own
        vocab[image_token_name(k)] = len(vocab)
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": [CHAMELEON_BOI, CHAMELEON_EOI, CHAMELEON_IMAGE]})
    return tokenizer


def build_tiny_chameleon(path: str | Path, seed: int = 0, vq_path: str | Path | None = None) -> Path:
    """Write a tiny, seeded Chameleon folder at ``path``: ``ChameleonForConditionalGeneration`` (4 layers of width
    128) + Llama tokenizer + ``vq/``, atomically. Returns ``path``."""
    path = Path(path)
    vq_source = Path(vq_path) if vq_path is not None else SHIPPED_SPRITE_VQ
    num_codes = load_image_tokenizer(vq_source).num_codes
    tokenizer = build_chameleon_tokenizer(num_codes)
    vocabulary_map = tokenizer.get_vocab()
    config = ChameleonConfig(
        vocab_size=len(vocabulary_map),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        vocabulary_map=vocabulary_map,
        image_token_id=vocabulary_map[CHAMELEON_IMAGE],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vq_config={
            "embed_dim": 32,
            "num_embeddings": num_codes,
            "latent_channels": 32,
            "base_channels": 32,
            "channel_multiplier": [1, 1],
            "num_res_blocks": 1,
            "resolution": 32,
        },
    )
    return write_tiny_lm_folder(path, ChameleonForConditionalGeneration, config, tokenizer, seed, vq_source)


class ChameleonIDM(TokenIDM):
    """``Q_φ(z | x, y)`` on a Chameleon / Anole folder (``ChameleonFWM``'s format): the action after both images,
    ``<s> <racm3:break> x <eoss> <racm3:break> y <eoss>`` → ``z </s>``. ``ChameleonIDM.sharing(fwm)`` runs it on the
    world model's own model (``shared_base``)."""

    fwm_class = ChameleonFWM
