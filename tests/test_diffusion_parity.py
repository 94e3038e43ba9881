"""Parity with diffusers: ``DiffusionFWM``'s greedy guided DDIM against ``StableDiffusionInstructPix2PixPipeline``.

Both load the same tiny latent-space folder (``build_tiny_instruct_pix2pix(..., latent=True)``) and sample from the
same start noise, so any difference in text/image encoding, the three guidance branches, their combination, the
DDIM update or the decoding shows up in the images. The maximum absolute differences are printed (run with ``-s``)
and recorded as junit properties.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, StableDiffusionInstructPix2PixPipeline
from torch import Tensor
from torch.testing import assert_close

from swirl_vl.models.diffusion_fwm import DiffusionFWM
from swirl_vl.models.tiny_diffusion import PIPELINE_CLASS, PIXEL_CLASS, SHIPPED_SPRITE_VAE, build_tiny_instruct_pix2pix

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["move the red circle left", "paint the blue square green"]
"""Two different prompts: rows of one batch must not leak into each other (nor be trivially equal)."""

STEPS = 4
IMAGE_SIZE = 32
"""A multiple of the tiny VAE's scale factor (4), so that the pipeline's image preprocessing does not resize."""

GUIDED, UNGUIDED = (3.0, 1.5), (1.0, 1.0)
"""``(guidance_scale, image_guidance_scale)``. The pipeline guides only when ``guidance_scale > 1`` and
``image_guidance_scale >= 1`` (its ``do_classifier_free_guidance``), and so does DiffusionFWM."""


@pytest.fixture(scope="module")
def latent_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_instruct_pix2pix(tmp_path_factory.mktemp("parity") / "latent", seed=0, latent=True)


def source_images() -> Tensor:
    """``(B, 3, H, W)`` in ``[0, 1]``: what both take as the source image."""
    return torch.rand(len(PROMPTS), 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


def load_pipeline(folder: Path) -> StableDiffusionInstructPix2PixPipeline:
    """The pipeline as a diffusers user loads it, sampling with DDIM from the folder's own scheduler config."""
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_sample(
    pipe: StableDiffusionInstructPix2PixPipeline, x: Tensor, seed: int, scales: tuple[float, float]
) -> Tensor:
    """``(B, 3, H, W)`` in ``[0, 1]``: deterministic DDIM (η = 0) from DiffusionFWM's documented greedy start noise,
    one ``randn((1, C, h, w))`` draw seeded with ``seed`` for every row (built here, not taken from DiffusionFWM)."""
    c, f = pipe.vae.config.latent_channels, pipe.vae_scale_factor
    start = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, c, x.shape[-2] // f, x.shape[-1] // f), generator=start).repeat(len(PROMPTS), 1, 1, 1)
    guidance_scale, image_guidance_scale = scales
    return pipe(
        prompt=PROMPTS,
        image=x,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        image_guidance_scale=image_guidance_scale,
        eta=0.0,
        latents=noise,
        output_type="pt",
    ).images


def assert_parity(
    fwm: DiffusionFWM,
    pipe: StableDiffusionInstructPix2PixPipeline,
    scales: tuple[float, float],
    record_property: Callable[[str, object], None],
) -> Tensor:
    """DiffusionFWM's greedy sample equals the pipeline's; prints and records the max abs difference."""
    x = source_images()
    ours = fwm.sample(x, PROMPTS, greedy=True).images
    theirs = pipeline_sample(pipe, x, fwm.seed, scales)
    diff = (ours - theirs).abs().max().item()
    print(f"parity scales={scales}: max |DiffusionFWM - pipeline| = {diff:.3e}")
    record_property(f"max_abs_diff_{scales[0]}_{scales[1]}", diff)
    assert ours.shape == theirs.shape == (len(PROMPTS), 3, IMAGE_SIZE, IMAGE_SIZE)
    assert_close(ours, theirs)
    # Not a vacuous match: the two prompts give different images, mostly away from the [0, 1] clamp.
    assert (ours[0] - ours[1]).abs().max() > 1e-2
    assert ((ours > 0) & (ours < 1)).float().mean() > 0.5
    return ours


def test_latent_folder_has_the_pipeline_layout(latent_path: Path) -> None:
    index = json.loads((latent_path / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINE_CLASS and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["safety_checker"] == index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    # The generic loader resolves the class from model_index.json alone.
    pipe = DiffusionPipeline.from_pretrained(latent_path)
    assert isinstance(pipe, StableDiffusionInstructPix2PixPipeline) and isinstance(pipe.scheduler, DDIMScheduler)
    assert (pipe.unet.config.in_channels, pipe.unet.config.out_channels) == (8, 4)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == IMAGE_SIZE
    config = pipe.scheduler.config
    assert (config.prediction_type, config.beta_schedule, config.steps_offset) == ("epsilon", "scaled_linear", 1)
    assert not config.clip_sample and not config.set_alpha_to_one
    size = sum(f.stat().st_size for f in latent_path.rglob("*") if f.is_file())
    assert size < 6e6, size
    assert DiffusionFWM(str(latent_path)).vae is not None


@pytest.mark.parametrize(
    "scales",
    [GUIDED, (7.5, 1.5), UNGUIDED, (1.0, 1.5), (3.0, 0.5)],
    ids=["guided", "default-scales", "unguided", "text-scale-1", "image-scale-below-1"],
)
def test_greedy_sample_equals_the_pipeline(
    latent_path: Path, scales: tuple[float, float], record_property: Callable[[str, object], None]
) -> None:
    guidance_scale, image_guidance_scale = scales
    fwm = DiffusionFWM(
        str(latent_path),
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        image_guidance_scale=image_guidance_scale,
    )
    assert_parity(fwm, load_pipeline(latent_path), scales, record_property)


def test_guidance_changes_the_sample(latent_path: Path) -> None:
    """The guided parity above compares something guidance actually moved."""
    fwm = DiffusionFWM(str(latent_path), num_inference_steps=STEPS)
    x = source_images()
    guided = fwm.sample(x, PROMPTS, greedy=True, guidance_scale=GUIDED[0], image_guidance_scale=GUIDED[1]).images
    unguided = fwm.sample(x, PROMPTS, greedy=True, guidance_scale=1.0, image_guidance_scale=1.0).images
    assert (guided - unguided).abs().max() > 1e-2


def test_pixel_folder_names_no_pipeline(tmp_path: Path) -> None:
    """Without a VAE no diffusers pipeline can load the folder, so its model_index.json does not claim one."""
    folder = build_tiny_instruct_pix2pix(tmp_path / "pixel", seed=0)
    fwm = DiffusionFWM(str(folder), num_inference_steps=STEPS)
    assert fwm.vae is None
    fwm.save_pretrained(tmp_path / "saved")
    for path in (folder, tmp_path / "saved"):
        index = json.loads((path / "model_index.json").read_text())
        assert index["_class_name"] == PIXEL_CLASS and index["_space"] == "pixel" and index["vae"] == [None, None]
        assert not hasattr(diffusers, index["_class_name"])


def test_save_pretrained_round_trips_into_the_pipeline(
    latent_path: Path, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    fwm = DiffusionFWM(str(latent_path), num_inference_steps=STEPS, guidance_scale=GUIDED[0])
    with torch.no_grad():
        fwm.unet.conv_out.bias.add_(0.05)  # not the weights on disk any more: the pipeline must see the saved ones
    fwm.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == PIPELINE_CLASS
    saved = assert_parity(fwm, load_pipeline(tmp_path / "saved"), GUIDED, record_property)
    original = DiffusionFWM(str(latent_path), num_inference_steps=STEPS, guidance_scale=GUIDED[0])
    assert not torch.allclose(saved, original.sample(source_images(), PROMPTS, greedy=True).images)


@pytest.mark.parametrize("scales", [GUIDED, UNGUIDED], ids=["guided", "unguided"])
def test_sprite_latent_folder_equals_the_pipeline(
    tmp_path: Path, scales: tuple[float, float], record_property: Callable[[str, object], None]
) -> None:
    """The sprite config's latent model (the shipped autoencoder, the x̂_0-predicting trailing schedule) is built
    through the same constructor the config uses, and the pipeline samples it as DiffusionFWM does."""
    path = tmp_path / "sprite_latent"
    fwm = DiffusionFWM(
        str(path),
        build_tiny=True,
        tiny_vae="sprites",
        num_inference_steps=STEPS,
        guidance_scale=scales[0],
        image_guidance_scale=scales[1],
    )
    config = fwm.scheduler.config
    assert (config.prediction_type, config.timestep_spacing, config.clip_sample) == ("sample", "trailing", False)
    shipped = AutoencoderKL.from_pretrained(SHIPPED_SPRITE_VAE)
    assert fwm.vae.config.scaling_factor == shipped.config.scaling_factor != 0.18215
    for ours, theirs in zip(fwm.vae.state_dict().values(), shipped.state_dict().values()):
        assert torch.equal(ours, theirs)
    assert_parity(fwm, load_pipeline(path), scales, record_property)
