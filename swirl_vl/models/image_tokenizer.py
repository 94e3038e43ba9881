"""Image tokenizers of token world models: images ↔ discrete codes, frozen, behind one seam.

A token FWM or IDM sees an image only as its codes: ``encode`` maps images ``(B, 3, H, W)`` in ``[0, 1]`` to
codes ``(B, h*w)`` in raster order, ``decode`` maps codes back to images in ``[0, 1]``. Every tokenizer here works
in ``[-1, 1]`` inside (the convention of the VQGANs these models were trained with). How a code becomes a token
of the host language model (named ``<|img_k|>`` tokens, or an offset after the text vocabulary) is the host's
business, not the tokenizer's.

- ``DiffusersVQ``: a diffusers ``VQModel`` folder: the shipped sprite-world tokenizer, and Chameleon's VQGAN (used
  by Chameleon, Anole and Liquid) after ``python -m swirl_vl.models.chameleon_vqgan`` has converted its
  ``vqgan.ckpt``. (transformers' ``ChameleonVQVAE`` holds only the encoder: it cannot decode generated codes.)
- ``JanusVQ``: transformers' ``JanusVQVAE`` (Janus-Pro's generation tokenizer), a folder with its config.
- ``Emu3VQ``: transformers' ``Emu3VQVAE`` (Emu3's tokenizer), a folder with its config.

``load_image_tokenizer(path)`` picks the class from the folder's ``config.json``. The tokenizer is never trained:
its parameters have ``requires_grad`` off and it stays in eval mode whatever the host's mode.

Because it is frozen, an image's codes never change: on CPU, ``encode`` keeps the codes of the images it has seen
(``CodeCache``, keyed by a digest of their exact pixels), so the labelled pairs that SFT revisits every epoch are
encoded once: on the sprite world, a token FWM's SFT step (batch 32, one thread) takes 0.76× the
CPU time (``benchmarks/vq_cache.py``).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import VQModel
from torch import Tensor, nn
from transformers import Emu3VQVAE, JanusVQVAE
from typing_extensions import override


class CodeCache:
    """The codes of images already encoded, keyed by a digest of each image's exact pixel bytes; the least recently
    used go first once the entries pass ``capacity_mib``. Keys are 16-byte BLAKE2b digests: two different images
    collide with probability ~2⁻¹²⁸. Codes are held on the CPU as int32 bytes; ``size`` counts them with the Python
    objects around each entry (~250 bytes, measured: 317 bytes of RSS per entry of 16 codes)."""

    ENTRY_OVERHEAD = 250

    def __init__(self, capacity_mib: float = 256.0) -> None:
        self.capacity = int(capacity_mib * 2**20)
        self.size = 0
        self.hits = self.misses = 0
        self._codes: OrderedDict[bytes, bytes] = OrderedDict()

    @staticmethod
    def keys(images: Tensor) -> list[bytes]:
        """One digest per image of ``images`` ``(B, …)`` (a CPU tensor), of its dtype, shape and pixel bytes."""
        rows = images.contiguous().view(images.shape[0], -1)
        head = f"{images.dtype}{tuple(images.shape[1:])}".encode()
        return [
            hashlib.blake2b(head + row.numpy().tobytes(), digest_size=16).digest() for row in rows.view(torch.uint8)
        ]

    def get(self, key: bytes) -> Tensor | None:
        """The codes ``(L,)`` (long) stored for ``key``, or None."""
        codes = self._codes.get(key)
        if codes is None:
            self.misses += 1
            return None
        self.hits += 1
        self._codes.move_to_end(key)
        return torch.frombuffer(bytearray(codes), dtype=torch.int32).long()

    def put(self, key: bytes, codes: Tensor) -> None:
        value = codes.to("cpu", torch.int32).numpy().tobytes()
        cost = len(key) + len(value) + self.ENTRY_OVERHEAD
        if key in self._codes or cost > self.capacity:
            return
        self._codes[key] = value
        self.size += cost
        while self.size > self.capacity:
            old_key, old_value = self._codes.popitem(last=False)
            self.size -= len(old_key) + len(old_value) + self.ENTRY_OVERHEAD

    def clear(self) -> None:
        self._codes.clear()
        self.size = 0


class ImageTokenizer(nn.Module):
    """Frozen images ↔ codes. Subclasses set ``num_codes`` and implement ``grid``, ``_encode``, ``_decode``.

    ``cache_mib``: room for the codes of images already encoded (``CodeCache``), used while the tokenizer is on the
    CPU; 0 turns it off. On an accelerator every image is encoded (hashing would first copy it to the host).
    """

    num_codes: int

    def __init__(self, model: nn.Module, cache_mib: float = 256.0) -> None:
        super().__init__()
        self.model = model
        self.model.requires_grad_(False).eval()
        self.cache = CodeCache(cache_mib)

    @override
    def train(self, mode: bool = True) -> ImageTokenizer:
        return super().train(False)  # frozen: codes must not depend on the host's mode

    @override
    def _apply(self, fn, recurse=True):  # .to(), .half(), ...: codes may depend on the weights' device and dtype
        self.cache.clear()
        return super()._apply(fn, recurse)

    @override
    def _load_from_state_dict(self, *args, **kwargs) -> None:  # new weights, new codes
        self.cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def grid(self, image_size: int) -> tuple[int, int]:
        """``(h, w)`` code grid of a square image of side ``image_size``."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` → codes ``(B, h*w)`` (long), raster order. On the CPU, a batch whose
        images have all been seen (the same pixels) is not encoded again. A batch with any new image is encoded whole,
        so that the encoder sees the batch sizes its callers give (encoding only the new images would hand it a
        different size at every call, and each new size keeps its own convolution buffers)."""
        if self.cache.capacity == 0 or images.device.type != "cpu" or self.device.type != "cpu":
            return self._encoded(images)
        keys = CodeCache.keys(images)
        found = [self.cache.get(key) for key in keys]
        if all(codes is not None for codes in found):
            return torch.stack(found)
        codes = self._encoded(images)
        for key, row in zip(keys, codes):
            self.cache.put(key, row)
        return codes

    def _encoded(self, images: Tensor) -> Tensor:
        codes = self._encode(images.to(self.dtype).clamp(0, 1) * 2 - 1)
        return codes.reshape(images.shape[0], -1)

    @torch.no_grad()
    def decode(self, codes: Tensor, grid: tuple[int, int]) -> Tensor:
        """Codes ``(B, h*w)`` → images ``(B, 3, H, W)`` in ``[0, 1]`` (float32). Every row is decoded: decoding only
        the distinct rows would save a fifth of Phase I's decoding on the sprite world, but a batch size that changes
        every call grew the process by ~300 MiB over 40 calls (the convolutions' buffers for each new size)."""
        if codes.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"{codes.shape[1]} codes per image do not fill a {grid[0]}×{grid[1]} grid")
        return ((self._decode(codes, grid).float() + 1) / 2).clamp(0, 1)

    def _encode(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError

    def _decode(self, codes: Tensor, grid: tuple[int, int]) -> Tensor:
        raise NotImplementedError

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)


class DiffusersVQ(ImageTokenizer):
    """A diffusers ``VQModel`` (encoder → quant_conv → nearest codebook entry; decoder from the entries)."""

    def __init__(self, model: VQModel) -> None:
        super().__init__(model)
        self.num_codes = model.config.num_vq_embeddings

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DiffusersVQ:
        return cls(VQModel.from_pretrained(path))

    @override
    def grid(self, image_size: int) -> tuple[int, int]:
        return vqmodel_grid(self.model, image_size)

    @override
    def _encode(self, pixels: Tensor) -> Tensor:
        return vqmodel_codes(self.model, pixels)

    @override
    def _decode(self, codes: Tensor, grid: tuple[int, int]) -> Tensor:
        return vqmodel_pixels(self.model, codes, grid)


def vqmodel_grid(model: VQModel, image_size: int) -> tuple[int, int]:
    """``(h, w)`` of a diffusers ``VQModel``'s code grid for square images of ``image_size`` pixels."""
    factor = 2 ** (len(model.config.block_out_channels) - 1)  # one stride-2 downsample per block but the last
    if image_size % factor:
        raise ValueError(f"image_size={image_size} is not a multiple of the VQ's downsampling factor {factor}")
    return image_size // factor, image_size // factor


def vqmodel_codes(model: VQModel, pixels: Tensor) -> Tensor:
    """A diffusers ``VQModel``'s codebook indices ``(B * h * w,)`` of ``pixels`` in ``[-1, 1]``, raster order."""
    _, _, (_, _, indices) = model.quantize(model.encode(pixels).latents)
    return indices


def vqmodel_pixels(model: VQModel, codes: Tensor, grid: tuple[int, int]) -> Tensor:
    """A diffusers ``VQModel``'s images in ``[-1, 1]`` (unclamped) of codes ``(B, h*w)`` on an ``h × w`` grid."""
    dim = model.quantize.embedding.weight.shape[1]
    quant = model.quantize.get_codebook_entry(codes.reshape(-1), (codes.shape[0], *grid, dim))
    return model.decode(quant, force_not_quantize=True).sample


class JanusVQ(ImageTokenizer):
    """transformers' ``JanusVQVAE``: a fixed grid of ``num_patches²`` codes (images are resized to its side)."""

    def __init__(self, model: JanusVQVAE) -> None:
        super().__init__(model)
        self.num_codes = model.config.num_embeddings
        self.image_size = model.config.num_patches * 2 ** (len(model.config.channel_multiplier) - 1)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> JanusVQ:
        return cls(JanusVQVAE.from_pretrained(path))

    @override
    def grid(self, image_size: int) -> tuple[int, int]:
        side = self.model.config.num_patches
        if image_size != self.image_size:
            raise ValueError(f"this Janus VQ codes {self.image_size}-pixel images, not {image_size}: set image_size")
        return side, side

    @override
    def _encode(self, pixels: Tensor) -> Tensor:
        return self.model.encode(pixels).image_tokens

    @override
    def _decode(self, codes: Tensor, grid: tuple[int, int]) -> Tensor:
        return self.model.decode(codes)


class Emu3VQ(ImageTokenizer):
    """transformers' ``Emu3VQVAE`` (Emu3's video tokenizer, used on single images): a still image is encoded as
    ``temporal_downsample_factor`` repeated frames and decoded as its first frame, as Emu3 does."""

    def __init__(self, model: Emu3VQVAE) -> None:
        super().__init__(model)
        self.num_codes = model.config.codebook_size
        self.factor = 2 ** (len(model.config.channel_multiplier) - 1)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Emu3VQ:
        return cls(Emu3VQVAE.from_pretrained(path))

    @override
    def grid(self, image_size: int) -> tuple[int, int]:
        return image_size // self.factor, image_size // self.factor

    @override
    def _encode(self, pixels: Tensor) -> Tensor:
        sizes = torch.tensor([pixels.shape[-2:]] * pixels.shape[0])
        return torch.stack(self.model.encode(pixels, sizes).image_tokens)

    @override
    def _decode(self, codes: Tensor, grid: tuple[int, int]) -> Tensor:
        return self.model.decode(codes.view(codes.shape[0], *grid))


def load_image_tokenizer(path: str | Path) -> ImageTokenizer:
    """The image tokenizer in folder ``path``, chosen by its ``config.json`` (diffusers ``VQModel``, Janus or Emu3
    VQ)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no image tokenizer at '{path}' (no config.json): expected a diffusers VQModel folder or a "
            "transformers JanusVQVAE folder"
        )
    config = json.loads(config_file.read_text())
    if config.get("_class_name") == "VQModel":
        return DiffusersVQ.from_pretrained(path)
    if config.get("model_type") == "janus_vqgan":
        return JanusVQ.from_pretrained(path)
    if config.get("model_type") == "emu3_vqgan":
        return Emu3VQ.from_pretrained(path)
    raise ValueError(
        f"'{config_file}' is not a diffusers VQModel (_class_name) nor a JanusVQVAE or Emu3VQVAE (model_type); "
        "Chameleon's vqgan.ckpt converts with `python -m swirl_vl.models.chameleon_vqgan`"
    )


def resize_square(images: Tensor, size: int) -> Tensor:
    """``images`` resized to ``size × size`` (bilinear, antialiased) unless they already are."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
