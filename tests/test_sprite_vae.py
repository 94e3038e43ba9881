"""The sprite world's autoencoder: the shipped one reconstructs states exactly; training exports a loadable one."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import pytest
from diffusers import AutoencoderKL

from datamodules import sprites
from swirl_vl.models.sprite_vae import VAETrainerModule, vae_roundtrip_accuracy
from swirl_vl.models.tiny_diffusion import SHIPPED_SPRITE_VAE
from swirl_vl.models.vq import SpriteImageDataModule

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shipped_vae_round_trips_sprite_states() -> None:
    size = sum(f.stat().st_size for f in SHIPPED_SPRITE_VAE.iterdir())
    assert size < 2**20, f"shipped VAE is {size} bytes"
    vae = AutoencoderKL.from_pretrained(SHIPPED_SPRITE_VAE).eval()
    rng = random.Random("vae-roundtrip-test")
    states = [sprites.random_state(rng) for _ in range(200)]
    assert vae_roundtrip_accuracy(vae, states) >= 0.99


def test_vae_training_lowers_the_loss_and_exports_a_scaled_vae(tmp_path: Path) -> None:
    module = VAETrainerModule(export_dir=str(tmp_path / "vae"))
    data = SpriteImageDataModule(batch_size=8, train_size=8 * 40, train_partner_redraw=0.0, val_size=16)
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False, barebones=True, callbacks=[Record()]
    )
    trainer.fit(module, data)
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert vae.config.latent_channels == 4 and vae.config.block_out_channels == [8, 16, 16]
    # The scaling factor gives the validation posterior means unit standard deviation.
    images = next(iter(data.val_dataloader()))["image"]
    latents = vae.encode(images * 2 - 1).latent_dist.mode() * vae.config.scaling_factor
    assert 0.5 < latents.std().item() < 2.0
