"""Builds a tiny, seeded, randomly initialised InstructPix2Pix folder for CPU training and tests.

The folder has the layout of ``timbrooks/instruct-pix2pix`` (``model_index.json``, ``unet/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) minus ``vae/``: the tiny model denoises pixels, so ``DiffusionFWM`` reads it
through exactly the code path of a real checkpoint. No diffusers pipeline works without a VAE, so its
``model_index.json`` names ``DiffusionFWM``. ``latent=True`` builds the full latent-space layout instead (a tiny
``AutoencoderKL`` in ``vae/``, Stable Diffusion's ε-prediction schedule as DDIM), which
``StableDiffusionInstructPix2PixPipeline.from_pretrained`` loads as it is (``tests/test_diffusion_parity.py``).

Nothing is downloaded: the CLIP tokenizer's ``vocab.json`` and ``merges.txt`` are learnt here from the sprite-world
words over CLIP's byte-level alphabet, so any other text still tokenizes (into characters).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections import Counter
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
"""CLIP's special tokens (EOS doubles as pad and unknown, as in the real tokenizer)."""

MAX_TEXT_LENGTH = 77
"""Token positions, as in Stable Diffusion's CLIP: every prompt is padded to this length."""

SPRITE_WORDS = (
    "move paint remove add the a an at row column of to and"
    " red green blue yellow purple orange white black"
    " square circle triangle left right up down"
).split()
"""Words of the sprite-world action grammar (plus a few fillers): each becomes one token."""

PIPELINE_CLASS = "StableDiffusionInstructPix2PixPipeline"
"""``_class_name`` of a latent-space folder: the diffusers pipeline that loads it."""

PIXEL_CLASS = "DiffusionFWM"
"""``_class_name`` of a pixel-space folder: no diffusers pipeline works without a VAE, only ``DiffusionFWM``."""


def _train_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that make each word one ``…</w>`` symbol: most frequent pair first, ties broken by the pair itself.

    Written out rather than using ``tokenizers``' trainer, whose tie-breaking follows a per-process hash order: the
    same seed must give the same vocabulary (hence the same embedding rows) in every process.
    """
    symbols = [[*word[:-1], word[-1] + "</w>"] for word in words]
    merges = []
    while True:
        counts = Counter(pair for word in symbols for pair in zip(word, word[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        symbols = [_merge(word, best) for word in symbols]


def _merge(word: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """A CLIP-format BPE vocabulary: 256 byte symbols, the same with ``</w>``, merges for SPRITE_WORDS, specials."""
    # Lower-case ASCII letters are their own symbols in byte-level BPE's byte-to-unicode table.
    assert all(word.isascii() and word.isalpha() and word.islower() for word in SPRITE_WORDS)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _train_merges(SPRITE_WORDS)
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}, [f"{a} {b}" for a, b in merges]


def _write_tokenizer(path: Path) -> CLIPTokenizer:
    vocab, merges = _clip_vocab_and_merges()
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TEXT_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return CLIPTokenizer.from_pretrained(path)


SHIPPED_SPRITE_VAE = Path(__file__).resolve().parent.parent / "assets" / "sprite_vae"
"""The trained sprite-world autoencoder shipped with the package (4× downsampling, 4 latent channels; made by
``swirl_vl.models.sprite_vae``)."""


def tiny_scheduler(clip_sample: bool = True) -> DDIMScheduler:
    """The tiny models' DDPM schedule; ``trailing`` spacing starts sampling from pure noise and ends at ᾱ = 1.

    The UNet predicts the clean image (``sample``), not ε: a tiny, briefly trained ε-model divides its error by
    √ᾱ_t ≈ 0.006 at the first steps, and 10-step samples stay grey (L1 0.47 to sprite targets after 600 SFT
    steps); predicting x_0, whose source is in the input, brings that to 0.03 within 150 steps.
    """
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=clip_sample,  # pixels live in [-1, 1]: clipping x̂_0 keeps few-step samples in range (not latents)
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        prediction_type="sample",
    )


def latent_scheduler() -> DDIMScheduler:
    """Stable Diffusion's ε-prediction schedule (the β's of ``timbrooks/instruct-pix2pix``) as DDIM, set as
    diffusers' SD DDIM configs are: no x̂_0 clipping (latents are unbounded), final ᾱ = ᾱ_0, steps offset 1."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def write_model_index(path: Path, has_vae: bool) -> None:
    """``model_index.json`` with each component's library and class.

    With a VAE it names the InstructPix2Pix pipeline (as the real folder does, no safety checker). Without one it
    names ``DiffusionFWM``: ``StableDiffusionInstructPix2PixPipeline`` needs a VAE, so claiming it would only make
    ``DiffusionPipeline.from_pretrained`` fail later and more obscurely.
    """
    components = {
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    if has_vae:
        index = {
            "_class_name": PIPELINE_CLASS,
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            **components,
            "vae": ["diffusers", "AutoencoderKL"],
        }
    else:
        # Underscored keys are metadata to diffusers; "_space" says why no pipeline is named.
        index = {
            "_class_name": PIXEL_CLASS,
            "_diffusers_version": diffusers.__version__,
            "_space": "pixel",
            **components,
            "vae": [None, None],
        }
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def build_instruct_pix2pix_folder(
    path: str | Path, seed: int = 0, image_size: int = 32, latent: bool = False, vae: str | Path | None = None
) -> Path:
    """Write the tiny model to ``path`` (created; existing files are overwritten) and return it.

    ``latent``: the latent-space layout (``vae/``, 8-in / 4-out UNet on ``image_size / 4`` latents, ε-prediction
    DDIM) that ``StableDiffusionInstructPix2PixPipeline`` loads; otherwise the pixel-space model.
    ``vae``: a trained ``AutoencoderKL`` folder (e.g. ``SHIPPED_SPRITE_VAE``): the latent layout on its
    latents, with the tiny models' x̂_0-predicting schedule (unclipped) instead of Stable Diffusion's ε schedule,
    for the reason ``tiny_scheduler`` gives. Implies ``latent``.
    """
    latent = latent or vae is not None
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _write_tokenizer(path / "tokenizer")

    # fork_rng: seeding must not disturb the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _tiny_text_encoder(tokenizer)
        if latent:
            autoencoder = tiny_autoencoder(image_size) if vae is None else AutoencoderKL.from_pretrained(vae)
            factor = 2 ** (len(autoencoder.config.block_out_channels) - 1)  # the pipeline's vae_scale_factor
            if image_size % factor:
                raise ValueError(f"image_size={image_size} must be a multiple of the VAE's scale factor {factor}")
            latent_channels = autoencoder.config.latent_channels
            unet = _tiny_unet(image_size // factor, 2 * latent_channels, latent_channels)
        else:
            unet = _tiny_unet(image_size)
    text_encoder.save_pretrained(path / "text_encoder")
    unet.save_pretrained(path / "unet")
    if not latent:
        scheduler = tiny_scheduler()
    elif vae is None:
        scheduler = latent_scheduler()
    else:
        scheduler = tiny_scheduler(clip_sample=False)
    scheduler.save_pretrained(path / "scheduler")
    if latent:
        autoencoder.save_pretrained(path / "vae")
    write_model_index(path, has_vae=latent)
    return path


def _tiny_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TEXT_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def tiny_autoencoder(image_size: int, block_out_channels: tuple[int, ...] = (8, 16, 16)) -> AutoencoderKL:
    """An untrained ``AutoencoderKL``: ``len - 1`` stride-2 downsamples (3 levels, scale factor 4: 32 px → 8×8
    latents), 4 latent channels, SD's scaling factor (the default; training sets its own)."""
    blocks = len(block_out_channels)
    return AutoencoderKL(
        sample_size=image_size,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(block_out_channels),
        latent_channels=4,
        norm_num_groups=8,
    )


def _tiny_unet(sample_size: int, in_channels: int = 6, out_channels: int = 3) -> UNet2DConditionModel:
    # Attention only at the coarsest level (sample_size / 4): self-attention there already sees the whole canvas
    # (an object can move anywhere), and on CPU attention at finer levels costs more than all the convolutions.
    return UNet2DConditionModel(
        sample_size=sample_size,
        # noisy target ‖ source image, as InstructPix2Pix: 3 + 3 pixels, or 4 + 4 latent channels
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=4,  # diffusers' name for the number of heads
    )


def build_tiny_instruct_pix2pix(
    path: str | Path, seed: int = 0, image_size: int = 32, latent: bool = False, vae: str | Path | None = None
) -> Path:
    """Build the tiny model in a temporary sibling folder, then rename it to ``path`` (never half-written).

    ``latent``, ``vae``: see ``build_instruct_pix2pix_folder``.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"'{path}' exists; build_tiny_instruct_pix2pix never overwrites a model folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.building-{uuid.uuid4().hex}"
    build_instruct_pix2pix_folder(tmp, seed=seed, image_size=image_size, latent=latent, vae=vae)
    try:
        tmp.rename(path)
    except OSError:
        # Another process built it first (e.g. DDP ranks): theirs is as good as ours.
        if not (path / "model_index.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return path
