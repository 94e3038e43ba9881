"""The autoencoder of the latent-space sprite ``DiffusionFWM``: a diffusers ``AutoencoderKL`` and how to train it.

InstructPix2Pix denoises in the latent space of a frozen autoencoder. A randomly initialised one does not
reconstruct anything, so the latent sprite model needs a trained one: ``VAETrainerModule`` trains it on rendered
sprite canvases (``SpriteImageDataModule``), and the trained weights ship in ``swirl_vl/assets/sprite_vae``:

    python -m swirl_vl fit --config configs/vae_sprites.yaml

4× downsampling: a 32-px canvas becomes 4 × 8 × 8 latents, so the UNet works on 16 times fewer positions than the
pixel-space model does.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from typing_extensions import override

from datamodules import sprites
from swirl_vl.models.tiny_diffusion import tiny_autoencoder
from swirl_vl.models.vq import (
    cosine_to_3_percent,
    foreground_weighted_recon_loss,
    roundtrip_accuracy,
    save_pretrained_atomically,
)


def vae_roundtrip_accuracy(vae: AutoencoderKL, states: list[sprites.SpriteState], batch_size: int = 250) -> float:
    """Share of ``states`` with ``parse(decode(encode(render(s)).mode)) == s``: what the autoencoder loses."""
    return roundtrip_accuracy(lambda images: _reconstruct(vae, images), states, vae.device, batch_size)


def _reconstruct(vae: AutoencoderKL, images: Tensor) -> Tensor:
    """``(B, 3, H, W)`` in ``[0, 1]`` → decoded posterior means, in ``[0, 1]``."""
    return ((vae.decode(vae.encode(images * 2 - 1).latent_dist.mode()).sample + 1) / 2).clamp(0, 1)


def _adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=2e-3)


class VAETrainerModule(LightningModule):
    """Trains a diffusers ``AutoencoderKL``: foreground-weighted reconstruction (MSE + L1) of a posterior sample,
    plus ``kl_weight`` × the KL of the posterior to N(0, I) (per latent element, as the reconstruction is per pixel).

    At the end of fit the config's ``scaling_factor`` is set to 1 / the standard deviation of the posterior means
    of the validation canvases (Stable Diffusion's 0.18215 is that figure for its own autoencoder), so the diffusion
    space has unit variance, and the model is written with ``save_pretrained`` to ``export_dir`` (atomically).
    """

    def __init__(
        self,
        block_out_channels: tuple[int, ...] = (8, 16, 16),
        image_size: int = 32,
        kl_weight: float = 1e-4,
        foreground_weight: float = 4.0,
        export_dir: str | None = None,
        optimizer: OptimizerCallable = _adam,
    ) -> None:
        """
        Args:
            block_out_channels: channels per resolution; ``len - 1`` stride-2 downsamples (3 blocks: 4×).
            image_size: training image side in pixels (stored in the config as ``sample_size``).
            kl_weight: weight of the KL term; larger keeps the latents closer to N(0, I), smaller reconstructs
                sharper.
            foreground_weight: extra reconstruction weight of pixels on or next to a shape (as the sprite VQ's).
            export_dir: where ``AutoencoderKL.save_pretrained`` writes the trained model at the end of fit.
            optimizer: optimiser factory; its learning rate decays on a cosine to 3% over the run's steps.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.vae = tiny_autoencoder(image_size, tuple(block_out_channels))
        self.kl_weight, self.foreground_weight = kl_weight, foreground_weight
        self.export_dir = export_dir
        self.optimizer = optimizer

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        images = batch["image"]
        posterior = self.vae.encode(images * 2 - 1).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        recon_loss = foreground_weighted_recon_loss(recon, images, self.foreground_weight)
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1 - posterior.logvar).mean()
        self.log_dict({"vae/recon": recon_loss, "vae/kl": kl}, prog_bar=True, batch_size=images.shape[0])
        return recon_loss + self.kl_weight * kl

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        images = batch["image"]
        recon = _reconstruct(self.vae, images)
        # Validation canvases are renders of valid states, so parse(input) is the true state.
        hits = [sprites.parse(r) == sprites.parse(x) for r, x in zip(recon.cpu(), images.cpu())]
        size = images.shape[0]
        self.log("val/vae_state_acc", torch.tensor(hits, dtype=torch.float32).mean(), prog_bar=True, batch_size=size)
        self.log("val/vae_l1", (recon - images).abs().mean(), batch_size=size)

    @override
    def configure_optimizers(self) -> dict:
        return cosine_to_3_percent(self.optimizer(self.vae.parameters()), self.trainer.estimated_stepping_batches)

    @override
    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        with torch.no_grad():
            means = [
                self.vae.encode(batch["image"].to(self.device) * 2 - 1).latent_dist.mode()
                for batch in self.trainer.datamodule.val_dataloader()
            ]
        self.vae.register_to_config(scaling_factor=1.0 / torch.cat(means).std().item())
        if self.export_dir is not None:
            save_pretrained_atomically(self.vae, self.export_dir)
