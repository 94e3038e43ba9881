"""DiffusionFWM on the tiny pixel-space InstructPix2Pix: loading, SFT, rollouts and their log-probs, the ELBO."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from torch.testing import assert_close
from transformers import CLIPTextModel, CLIPTokenizer

from swirl_vl.models.diffusion_fwm import DiffusionFWM
from swirl_vl.models.tiny_diffusion import SPRITE_WORDS, build_tiny_instruct_pix2pix

ACTIONS = ["move the red circle left", "add a red square at row 2 column 3"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_instruct_pix2pix(tmp_path_factory.mktemp("fwm") / "tiny", seed=0)


@pytest.fixture()
def fwm(tiny_path: Path) -> DiffusionFWM:
    return DiffusionFWM(str(tiny_path), num_inference_steps=4)


def images(b: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_tiny_folder_has_the_instruct_pix2pix_layout_and_loads_with_plain_classes(tiny_path: Path) -> None:
    index = json.loads((tiny_path / "model_index.json").read_text())
    assert index["_class_name"] == "DiffusionFWM" and index["_space"] == "pixel"  # no VAE: no diffusers pipeline
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == [None, None]
    assert (tiny_path / "tokenizer" / "vocab.json").exists() and (tiny_path / "tokenizer" / "merges.txt").exists()
    unet = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet")
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (6, 3, 32)
    text_encoder = CLIPTextModel.from_pretrained(tiny_path, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_path, subfolder="tokenizer")
    assert text_encoder.config.vocab_size == len(tokenizer)
    assert isinstance(DDIMScheduler.from_pretrained(tiny_path, subfolder="scheduler"), DDIMScheduler)
    # Grammar words are single tokens; any other text still tokenizes, into byte-level characters.
    for word in SPRITE_WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    # Fixed ids: the vocabulary is the same in every process (no hash-order tie-breaking).
    assert tokenizer("move the red circle left").input_ids == [588, 519, 582, 577, 543, 565, 589]
    ids = tokenizer("Make the man stand up!", add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == "make the man stand up !"


def test_missing_folder_says_what_to_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="timbrooks/instruct-pix2pix.*build_tiny"):
        DiffusionFWM(str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="num_inference_steps"):
        DiffusionFWM(str(tmp_path / "absent"), num_inference_steps=1)


def test_build_tiny_builds_once_then_loads(tmp_path: Path) -> None:
    a = DiffusionFWM(str(tmp_path / "m"), build_tiny=True, seed=3)
    b = DiffusionFWM.from_pretrained(tmp_path / "m")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert not list(tmp_path.glob(".m.building-*"))


def test_sft_loss_is_finite_and_trains_unet_and_text_encoder(fwm: DiffusionFWM) -> None:
    loss = fwm.sft_loss(images(2), ACTIONS, images(2, seed=1))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert fwm.unet.conv_in.weight.grad.abs().sum() > 0
    assert fwm.text_encoder.get_input_embeddings().weight.grad.abs().sum() > 0


def test_sample_shapes_group_order_and_mask(tiny_path: Path) -> None:
    fwm = DiffusionFWM(str(tiny_path), num_inference_steps=5, train_timestep_fraction=0.5)
    rollout = fwm.sample(images(2), ACTIONS, num_samples=3, generator=torch.Generator().manual_seed(0))
    n, s = 6, 5
    assert rollout.group_size == 3 and rollout.old_logprobs.shape == (n, s) and rollout.mask.shape == (n, s)
    assert rollout.images.shape == (n, 3, 32, 32) and 0 <= rollout.images.min() and rollout.images.max() <= 1
    assert rollout.context["latents"].shape == (n, s + 1, 3, 32, 32)
    assert rollout.context["timesteps"].shape == (s,)
    # Group-major: rows b*G .. b*G+G-1 all belong to condition b.
    ids = rollout.context["input_ids"]
    assert torch.equal(ids[0], ids[2]) and not torch.equal(ids[2], ids[3])
    # The last step is never trained; half of the other four are, per row.
    assert not rollout.mask[:, -1].any()
    assert rollout.mask.sum(dim=1).tolist() == [2] * n
    assert (rollout.old_logprobs[~rollout.mask] == 0).all() and (rollout.old_logprobs[rollout.mask] != 0).all()


def test_greedy_is_deterministic_batch_independent_and_untrainable(fwm: DiffusionFWM) -> None:
    a = fwm.sample(images(2), ACTIONS, greedy=True)
    b = fwm.sample(images(2)[1:], ACTIONS[1:], greedy=True)
    # Same start noise for every row; only float rounding of a different batch size separates the two.
    assert_close(a.images[1:], b.images, atol=1e-4, rtol=1e-3)
    assert not a.mask.any()
    with pytest.raises(ValueError, match="greedy"):
        fwm.sample(images(2), ACTIONS, num_samples=2, greedy=True)


def test_eta_changes_the_samples(fwm: DiffusionFWM) -> None:
    def sample(eta: float) -> torch.Tensor:
        return fwm.sample(images(1), ACTIONS[:1], eta=eta, generator=torch.Generator().manual_seed(0)).images

    assert_close(sample(1.0), sample(1.0))
    assert not torch.allclose(sample(1.0), sample(0.5))


def test_recorded_logprobs_equal_recomputed_ones_and_carry_grad(fwm: DiffusionFWM) -> None:
    rollout = fwm.sample(images(2), ACTIONS, num_samples=2)
    logprobs, mask = fwm.rollout_logprobs(rollout)
    assert torch.equal(mask, rollout.mask)
    assert_close(logprobs, rollout.old_logprobs)
    logprobs[mask].sum().backward()
    assert fwm.unet.conv_out.weight.grad.abs().sum() > 0


def test_log_likelihood_shares_draws_within_groups(fwm: DiffusionFWM) -> None:
    x, y = images(2).repeat_interleave(2, 0), images(2, seed=1).repeat_interleave(2, 0)
    z = [ACTIONS[0], ACTIONS[0], ACTIONS[1], ACTIONS[1]]
    ll = fwm.log_likelihood(x, z, y, group_size=2, seed=0)
    assert ll.shape == (4,) and torch.isfinite(ll).all() and (ll < 0).all()
    # Identical inputs in one group get identical draws, hence identical values; the two groups' draws differ.
    assert ll[0] == ll[1] and ll[2] == ll[3]
    assert torch.equal(ll, fwm.log_likelihood(x, z, y, group_size=2, seed=0))
    assert not torch.equal(ll, fwm.log_likelihood(x, z, y, group_size=2, seed=1))
    # Without groups (group_size=1) each row draws its own noise.
    ungrouped = fwm.log_likelihood(x, z, y, group_size=1, seed=0)
    assert ungrouped[0] != ungrouped[1]


def test_log_likelihood_of_training_targets_rises_with_sft(fwm: DiffusionFWM) -> None:
    x, y = images(4), images(4, seed=1)
    z = ACTIONS * 2
    before = fwm.log_likelihood(x, z, y, seed=0)
    optimizer = torch.optim.Adam(fwm.parameters(), lr=2e-3)
    torch.manual_seed(0)
    for _ in range(8):
        optimizer.zero_grad()
        fwm.sft_loss(x, z, y).backward()
        optimizer.step()
    after = fwm.log_likelihood(x, z, y, seed=0)
    assert after.mean() > before.mean() + 0.05, (before, after)


def test_save_pretrained_round_trip(fwm: DiffusionFWM, tmp_path: Path) -> None:
    with torch.no_grad():
        fwm.unet.conv_out.bias.add_(0.1)  # not the weights on disk any more
    fwm.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == "DiffusionFWM"
    loaded = DiffusionFWM.from_pretrained(tmp_path / "saved")
    assert fwm.state_dict().keys() == loaded.state_dict().keys()
    for name, p in fwm.state_dict().items():
        assert torch.equal(p, loaded.state_dict()[name]), name
    loaded.num_inference_steps = fwm.num_inference_steps
    assert torch.equal(
        fwm.sample(images(1), ACTIONS[:1], greedy=True).images,
        loaded.sample(images(1), ACTIONS[:1], greedy=True).images,
    )
    assert torch.equal(fwm._tokenize(ACTIONS), loaded._tokenize(ACTIONS))


def test_latent_space_folder_with_vae_like_timbrooks_instruct_pix2pix(tiny_path: Path, tmp_path: Path) -> None:
    """A real-layout folder: a VAE, an 8-in / 4-out latent UNet and an Euler-ancestral scheduler config."""
    folder = tmp_path / "latent"
    shutil.copytree(tiny_path, folder)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
    )
    vae.save_pretrained(folder / "vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    config = {**unet.config, "in_channels": 8, "out_channels": 4, "sample_size": 16}
    UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    shutil.rmtree(folder / "scheduler")
    EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear", steps_offset=1).save_pretrained(folder / "scheduler")

    fwm = DiffusionFWM(str(folder), num_inference_steps=3)
    # The Euler config has no DDIM keys: latents are never clipped, and the last step lands on ᾱ_0, not 1.
    assert not fwm.scheduler.config.clip_sample and not fwm.scheduler.config.set_alpha_to_one
    assert fwm.vae is not None and not any(p.requires_grad for p in fwm.vae.parameters())
    fwm.train()
    assert not fwm.vae.training
    assert torch.isfinite(fwm.sft_loss(images(2), ACTIONS, images(2, seed=1)))
    rollout = fwm.sample(images(2), ACTIONS, num_samples=2)
    assert rollout.images.shape == (4, 3, 32, 32)
    assert rollout.context["latents"].shape == (4, 4, 4, 16, 16)
    assert_close(fwm.rollout_logprobs(rollout)[0], rollout.old_logprobs)
    assert fwm.log_likelihood(images(2), ACTIONS, images(2, seed=1), seed=0).shape == (2,)
    fwm.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    assert AutoencoderKL.from_pretrained(tmp_path / "saved", subfolder="vae").config.latent_channels == 4
