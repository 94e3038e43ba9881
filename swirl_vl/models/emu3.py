"""Emu3 as a token world model: transformers' Emu3 format, read by its own classes.

An Emu3 folder (``BAAI/Emu3-Gen-hf``, ``BAAI/Emu3-Chat-hf``) is ``Emu3ForConditionalGeneration``: ``config.json``
with the tokenizer's ``vocabulary_map`` and the ``Emu3VQVAE`` image tokenizer's config, safetensors (the VQ's weights
inside, under ``model.vqmodel``), a GPT-2-style byte-level BPE tokenizer and the ``Emu3Processor`` files. Image
code ``k`` is the token named ``<|visual token k|>`` (six digits), as transformers' ``Emu3ImageVocabularyMapping``
reads the vocabulary map. An image of ``h × w`` codes sits in a sequence as ``Emu3Processor`` lays it out:

    <|image start|> h*w <|image token|> row_1 <|extra_200|> … row_h <|extra_200|> <|extra_201|> <|image end|>

every row of ``w`` codes ending with the row-end token ``<|extra_200|>``, which the model itself inserts when it
embeds an image (``convert_img2bpe``). ``Emu3FWM`` prompts

    <|extra_203|> {action} [x as above] <|image start|> h*w <|image token|>

and generates ``y``'s ``h·(w + 1)`` tokens as Emu3's own image generation constrains them (the
``prefix_allowed_tokens_fn`` of transformers' Emu3 example): image codes within a row, the row-end token at its end.
The row ends are fixed (probability 1): only the ``h·w`` codes are sampled and scored.

The image tokenizer is the folder's own ``Emu3VQVAE`` (it encodes and decodes), unless ``vq_path`` or a ``vq/``
subfolder names another: the tiny sprite-world folder carries the shipped sprite VQ there, because a randomly
initialised Emu3 VQ cannot tokenise sprites usefully.

``build_tiny_emu3`` writes the layout at a few MB: a 4-layer Emu3 text model, a tiny random ``Emu3VQVAE`` with one
code per ``<|visual token k|>``, a GPT-2 tokenizer (byte-level BPE trained on a seed corpus) with Emu3's special
tokens, Emu3's image processor, and the sprite VQ in ``vq/`` (left out with ``own_vq=True``).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn
from transformers import (
    Emu3Config,
    Emu3ForConditionalGeneration,
    Emu3ImageProcessor,
    Emu3Processor,
    GPT2Tokenizer,
)
from transformers.models.emu3.modeling_emu3 import Emu3ImageVocabularyMapping
from typing_extensions import override

from swirl_vl.models.image_tokenizer import Emu3VQ, ImageTokenizer, load_image_tokenizer
from swirl_vl.models.text import byte_level_bpe
from swirl_vl.models.token_fwm import TokenFWM, write_tiny_lm_folder
from swirl_vl.models.token_idm import TokenIDM
from swirl_vl.models.vq import SHIPPED_SPRITE_VQ

EMU3_BOI, EMU3_EOI, EMU3_WRAPPER, EMU3_IMAGE = "<|image start|>", "<|image end|>", "<|image token|>", "<image>"
EMU3_EOL, EMU3_EOF = "<|extra_200|>", "<|extra_201|>"
EMU3_PAD, EMU3_BOS, EMU3_EOS = "<|endoftext|>", "<|extra_203|>", "<|extra_204|>"
# The tokenizer's named special tokens, as Emu3Processor reads them (tokenizer.boi_token, …).
EMU3_NAMED_TOKENS = {
    "image_token": EMU3_IMAGE,
    "boi_token": EMU3_BOI,
    "eoi_token": EMU3_EOI,
    "image_wrapper_token": EMU3_WRAPPER,
    "eof_token": EMU3_EOF,
}


def visual_token_name(code: int) -> str:
    """Emu3's vocabulary name of image code ``code``."""
    return f"<|visual token {code:06d}|>"


class Emu3FWM(TokenFWM):
    """``P_θ(y | x, z)`` on an Emu3 folder: ``y``'s VQ codes, rows ended by Emu3's row-end token, after the action
    and ``x``."""

    folder_format = "Emu3"

    def __init__(
        self,
        path: str,
        build_tiny: bool = False,
        seed: int = 0,
        vq_path: str | None = None,
        image_size: int | None = None,
        guidance_scale: float = 1.0,
        negative_prompt: str = "",
        unconditional_dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        """
        Args:
            path: Emu3 folder (``Emu3ForConditionalGeneration`` + processor files; its own VQ unless ``vq/``).
            build_tiny: when ``path`` holds no model, write a tiny randomly initialised one there first.
            seed: initialisation seed of the tiny model.
            vq_path: image tokenizer folder; default ``<path>/vq`` if there is one, else the folder's ``Emu3VQVAE``.
            image_size: side in pixels the VQ sees; inputs are resized. None: a saved folder's, else 512.
            guidance_scale: classifier-free guidance on the logits when sampling, against the prompt with
                ``negative_prompt`` in the action's place (Emu3's own example guides against a negative prompt);
                1 samples unguided. GRPO then scores the guided policy it sampled; likelihoods stay unguided.
            negative_prompt: the text of the unconditional prompt ("" : the prompt without the action).
            unconditional_dropout: share of SFT examples trained after the unconditional prompt instead.
            gradient_checkpointing: recompute the language model's activations in backward.
        """
        self.negative_prompt = negative_prompt
        self._set_guidance(guidance_scale, unconditional_dropout)
        super().__init__(path, build_tiny, seed, vq_path, image_size, gradient_checkpointing)

    default_image_size = 512  # Emu3's processor's smallest image (min_pixels 512²)

    @classmethod
    def _download_hint(cls) -> str:
        return (
            "Download Emu3 (`hf download BAAI/Emu3-Gen-hf --local-dir PATH` to generate images, "
            "`hf download BAAI/Emu3-Chat-hf --local-dir PATH` to name actions)"
        )

    @override
    def _build_tiny(self, folder: Path, seed: int, vq_path: str | None) -> None:
        build_tiny_emu3(folder, seed=seed, vq_path=vq_path)

    @override
    def _load_lm(self, folder: Path) -> nn.Module:
        lm = Emu3ForConditionalGeneration.from_pretrained(folder)
        lm.model.vqmodel.requires_grad_(False)  # Emu3's VQ is frozen (and the image tokenizer unless vq/ names one)
        return lm

    @override
    def _load_image_tokenizer(self, folder: Path, vq_path: str | None) -> ImageTokenizer:
        """``vq_path``, else ``<folder>/vq`` if there is one, else the folder's own ``Emu3VQVAE``."""
        if vq_path is not None or (folder / "vq" / "config.json").is_file():
            return super()._load_image_tokenizer(folder, vq_path)
        self.vq_in_lm = True
        return Emu3VQ(self.lm.model.vqmodel)

    @override
    def _vocabulary(self, num_codes: int, path: str) -> tuple[list[int], int, int]:
        """Code ``k`` is the token the vocabulary map names ``<|visual token k|>``."""
        vocabulary = self.lm.config.vocabulary_map
        img2bpe = Emu3ImageVocabularyMapping(vocabulary).img2bpe
        missing = [k for k in range(num_codes) if k not in img2bpe]
        if missing:
            raise ValueError(
                f"the vocabulary map at '{path}' has no image token for codes {missing[:5]} of the image tokenizer's "
                f"{num_codes} (e.g. '{visual_token_name(missing[0])}')"
            )
        needed = (EMU3_BOI, EMU3_EOI, EMU3_WRAPPER, EMU3_EOL, EMU3_EOF)
        if any(t not in vocabulary for t in needed):
            raise ValueError(f"the vocabulary map at '{path}' lacks some of Emu3's image tokens {needed}")
        self.wrapper_id, self.eol_id, self.eof_id = (vocabulary[t] for t in (EMU3_WRAPPER, EMU3_EOL, EMU3_EOF))
        return [img2bpe[k] for k in range(num_codes)], vocabulary[EMU3_BOI], vocabulary[EMU3_EOI]

    @override
    def _image_layout(self) -> list[int]:
        """Each row of ``w`` codes ends with ``<|extra_200|>``, as Emu3 embeds and generates images."""
        height, width = self.grid
        return ([-1] * width + [self.eol_id]) * height

    def image_header(self) -> list[int]:
        """``<|image start|> h*w <|image token|>``: what precedes an image's rows (the processor's layout)."""
        size = self.tokenizer(f"{self.grid[0]}*{self.grid[1]}", add_special_tokens=False)["input_ids"]
        return [self.boi_id, *size, self.wrapper_id]

    @override
    def _prompt_rows(self, x_tokens: list[list[int]], z: list[str]) -> list[list[int]]:
        """``<bos> z <|image start|> h*w <|image token|> x <|extra_201|> <|image end|> <|image start|> h*w
        <|image token|>``."""
        texts = self.tokenizer(list(z), add_special_tokens=False)["input_ids"]
        header = self.image_header()
        return [
            [*self._bos, *text, *header, *xt, self.eof_id, self.eoi_id, *header] for xt, text in zip(x_tokens, texts)
        ]

    @override
    def _unconditional_rows(self, x_tokens: list[list[int]]) -> list[list[int]]:
        """The prompt with ``negative_prompt`` in the action's place."""
        return self._prompt_rows(x_tokens, [self.negative_prompt] * len(x_tokens))


def build_emu3_processor(num_codes: int, image_size: int, factor: int, vocab_size: int = 600) -> Emu3Processor:
    """A tiny ``Emu3Processor``: a GPT-2 tokenizer (byte-level BPE, as Emu3's) with Emu3's special tokens and one
    ``<|visual token k|>`` per image code after the text vocabulary, and Emu3's image processor sized to
    ``image_size`` (normalised to ``[-1, 1]``, as the image tokenizers here see images). Deterministic."""
    specials = [EMU3_PAD, EMU3_BOS, EMU3_EOS, EMU3_BOI, EMU3_EOI, EMU3_WRAPPER, EMU3_IMAGE, EMU3_EOL, EMU3_EOF]
    bpe = json.loads(byte_level_bpe(specials, vocab_size).to_str())["model"]
    vocab = dict(bpe["vocab"])
    visual = [visual_token_name(k) for k in range(num_codes)]
    for name in visual:
        vocab[name] = len(vocab)
    tokenizer = GPT2Tokenizer(
        vocab=vocab,
        merges=[tuple(m) for m in bpe["merges"]],
        unk_token=EMU3_PAD,
        bos_token=EMU3_BOS,
        eos_token=EMU3_EOS,
        pad_token=EMU3_PAD,
        extra_special_tokens=EMU3_NAMED_TOKENS,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [EMU3_EOL, *visual]})
    image_processor = Emu3ImageProcessor(
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        min_pixels=image_size * image_size,
        max_pixels=image_size * image_size,
        spatial_factor=factor,
    )
    return Emu3Processor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_emu3(
    path: str | Path, seed: int = 0, vq_path: str | Path | None = None, own_vq: bool = False, image_size: int = 32
) -> Path:
    """Write a tiny, seeded Emu3 folder at ``path``: ``Emu3ForConditionalGeneration`` (4 text layers of width 128,
    a tiny ``Emu3VQVAE`` downsampling 8×) + its processor + ``vq/`` (a copy of ``vq_path``, default the shipped
    sprite VQ; none with ``own_vq``), atomically. Returns ``path``."""
    path = Path(path)
    vq_source = Path(vq_path) if vq_path is not None else SHIPPED_SPRITE_VQ
    num_codes = load_image_tokenizer(vq_source).num_codes
    factor = 8
    processor = build_emu3_processor(num_codes, image_size, factor)
    tokenizer = processor.tokenizer
    vocabulary_map = tokenizer.get_vocab()
    config = Emu3Config(
        text_config={
            "vocab_size": len(vocabulary_map),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 1024,
            "attention_dropout": 0.0,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vq_config={
            "codebook_size": num_codes,
            "embed_dim": 8,
            "latent_channels": 8,
            "base_channels": 32,
            "channel_multiplier": [1, 1, 1, 1],  # three 2× downsamples
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "temporal_downsample_factor": 1,
            "hidden_size": 32,
            "num_attention_heads": 1,
        },
        vocabulary_map=vocabulary_map,
    )
    return write_tiny_lm_folder(
        path, Emu3ForConditionalGeneration, config, processor, seed, None if own_vq else vq_source
    )


class Emu3IDM(TokenIDM):
    """``Q_φ(z | x, y)`` on an Emu3 folder (``Emu3FWM``'s format): the action after both images, each laid out as
    ``Emu3Processor`` lays it out, ``<|extra_203|> [x] [y]`` → ``z <|extra_204|>``. ``Emu3IDM.sharing(fwm)`` runs
    it on the world model's own model (``shared_base``)."""

    fwm_class = Emu3FWM

    image_header = Emu3FWM.image_header  # reads boi_id, wrapper_id, grid and the tokenizer, which the IDM holds

    @override
    def _adopt(self, fwm: Emu3FWM, max_new_tokens: int) -> None:
        self.wrapper_id, self.eof_id = fwm.wrapper_id, fwm.eof_id  # the image header's tokens, before the prompt's
        super()._adopt(fwm, max_new_tokens)

    @override
    def _prompt_pieces(self) -> tuple[list[int], list[int], list[int]]:
        header, eof = self.image_header(), self.eof_id
        return [*self._bos, *header], [eof, self.eoi_id, *header], [eof, self.eoi_id]
