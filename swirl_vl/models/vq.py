"""The image tokenizer of ``TokenFWM``: a diffusers ``VQModel``, its encode/decode helpers, and how to train it.

``vq_encode`` / ``vq_decode`` map images ``(B, 3, H, W)`` in ``[0, 1]`` to codebook indices ``(B, h*w)`` (raster
order) and back. ``VQTokenizerModule`` + ``SpriteImageDataModule`` train a tiny one on rendered sprite states:

    python -m swirl_vl fit --config configs/vq_sprites.yaml

The shipped tokenizer (``swirl_vl/assets/sprite_vq``, see its README) was made this way.
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ModelMixin, VQModel
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from datamodules import sprites
from swirl_vl.models.image_tokenizer import vqmodel_codes, vqmodel_pixels
from swirl_vl.models.image_tokenizer import vqmodel_grid as vq_grid

SHIPPED_SPRITE_VQ = Path(__file__).resolve().parent.parent / "assets" / "sprite_vq"
"""The trained sprite-world tokenizer shipped with the package (8× downsampling, 64 codes)."""


@torch.no_grad()
def vq_encode(vq: VQModel, images: Tensor) -> Tensor:
    """Images ``(B, 3, H, W)`` in ``[0, 1]`` → codebook indices ``(B, h*w)``, raster order."""
    return vqmodel_codes(vq, images * 2 - 1).view(images.shape[0], -1)  # VQModel works in [-1, 1]


@torch.no_grad()
def vq_decode(vq: VQModel, codes: Tensor, grid: tuple[int, int]) -> Tensor:
    """Codebook indices ``(B, h*w)`` → images ``(B, 3, H, W)`` in ``[0, 1]``."""
    return ((vqmodel_pixels(vq, codes, grid) + 1) / 2).clamp(0, 1)


def render_tensor(state: sprites.SpriteState) -> Tensor:
    """``(3, 32, 32)`` float image in ``[0, 1]`` of a sprite state."""
    return torch.from_numpy(np.array(sprites.render(state))).permute(2, 0, 1).float() / 255


@torch.no_grad()
def roundtrip_accuracy(
    reconstruct: Callable[[Tensor], Tensor], states: list[sprites.SpriteState], device: torch.device, batch_size: int
) -> float:
    """Share of ``states`` with ``parse(reconstruct(render(s))) == s``; ``reconstruct`` maps ``(B, 3, H, W)`` images
    in ``[0, 1]`` to images in ``[0, 1]`` (an image tokenizer's or autoencoder's round trip)."""
    hits = 0
    for i in range(0, len(states), batch_size):
        chunk = states[i : i + batch_size]
        recon = reconstruct(torch.stack([render_tensor(s) for s in chunk]).to(device)).cpu()
        hits += sum(sprites.parse(r) == s for r, s in zip(recon, chunk))
    return hits / len(states)


def sprite_roundtrip_accuracy(vq: VQModel, num_states: int = 1000, seed: int = 0, batch_size: int = 250) -> float:
    """Share of random sprite states ``s`` with ``parse(vq_decode(vq_encode(render(s)))) == s``."""
    rng = random.Random(f"vq-roundtrip-{seed}")
    states = [sprites.random_state(rng) for _ in range(num_states)]
    device = next(vq.parameters()).device
    return roundtrip_accuracy(
        lambda images: vq_decode(vq, vq_encode(vq, images), vq_grid(vq, images.shape[-1])), states, device, batch_size
    )


def cell_contents(state: sprites.SpriteState) -> list[tuple[str, str] | None]:
    """``(colour, shape)`` or None for each of the ``GRID²`` cells, raster order (the VQ's code order)."""
    cells: list[tuple[str, str] | None] = [None] * (sprites.GRID * sprites.GRID)
    for o in state.objects:
        cells[o.row * sprites.GRID + o.col] = (o.colour, o.shape)
    return cells


def sprite_code_purity(vq: VQModel, num_states: int = 1000, seed: int = 0) -> float:
    """Share of cells of random states whose code is the most common code of their content (1 = canonical codes).

    A world model copies unchanged cells token by token only if a cell's code does not depend on its neighbours.
    """
    rng = random.Random(f"vq-purity-{seed}")
    states = [sprites.random_state(rng) for _ in range(num_states)]
    codes = vq_encode(vq, torch.stack([render_tensor(s) for s in states]).to(next(vq.parameters()).device))
    counts: dict[tuple[str, str] | None, Counter[int]] = defaultdict(Counter)
    for state, row in zip(states, codes.tolist()):
        for content, code in zip(cell_contents(state), row):
            counts[content][code] += 1
    return sum(c.most_common(1)[0][1] for c in counts.values()) / codes.numel()


def _state_from_cells(cells: list[tuple[str, str] | None]) -> sprites.SpriteState:
    g = sprites.GRID
    return sprites.SpriteState(tuple(sprites.Sprite(*c, k // g, k % g) for k, c in enumerate(cells) if c is not None))


def _dense_cells(rng: random.Random, density: float) -> list[tuple[str, str] | None]:
    return [
        (rng.choice(sprites.COLOURS), rng.choice(sprites.SHAPES)) if rng.random() < density else None
        for _ in range(sprites.GRID * sprites.GRID)
    ]


class SpriteImages(Dataset):
    """Sprite canvases; item ``i`` is a fixed function of ``(seed, split, i)``: ``{"image": (3, H, W)}`` in ``[0, 1]``.

    ``density=None`` draws valid world states (``random_state``). A float draws dense canvases instead: each cell
    independently holds a uniformly random (colour, shape) with that probability. They are not valid states (any
    count, repeats allowed), but a tokenizer codes cells, not states, and dense canvases show it every cell content
    in many contexts per batch. With ``partner_redraw > 0`` (dense only) an item adds a ``"partner"`` canvas that
    redraws each cell with that probability, and ``"shared"`` ``(GRID, GRID)`` bool: the cells the two agree on.
    """

    def __init__(
        self, size: int, seed: int, split: str, density: float | None = None, partner_redraw: float = 0.0
    ) -> None:
        if partner_redraw and density is None:
            raise ValueError("partner canvases need dense canvases: set density")
        self.size, self.seed, self.split = size, seed, split
        self.density, self.partner_redraw = density, partner_redraw

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        # One RNG per item rather than per worker: the data do not depend on num_workers or the DDP world size.
        rng = random.Random(f"sprite-images-{self.seed}-{self.split}-{index}")
        if self.density is None:
            return {"image": render_tensor(sprites.random_state(rng))}
        cells = _dense_cells(rng, self.density)
        item = {"image": render_tensor(_state_from_cells(cells))}
        if self.partner_redraw:
            redrawn = _dense_cells(rng, self.density)
            partner = [b if rng.random() < self.partner_redraw else a for a, b in zip(cells, redrawn)]
            item["partner"] = render_tensor(_state_from_cells(partner))
            item["shared"] = torch.tensor([a == b for a, b in zip(cells, partner)]).view(sprites.GRID, sprites.GRID)
        return item


class SpriteImageDataModule(LightningDataModule):
    """Batches of sprite canvases (``SpriteImages`` items, ``(B, 3, 32, 32)``) for training an image tokenizer."""

    def __init__(
        self,
        batch_size: int = 32,
        train_size: int = 200_000,
        train_density: float | None = 0.5,
        train_partner_redraw: float = 0.5,
        val_size: int = 512,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            batch_size: canvases per batch, per device.
            train_size: canvases per training epoch (each drawn afresh).
            train_density: share of occupied cells in training canvases; None trains on valid world states.
                Validation always uses valid world states.
            train_partner_redraw: share of cells redrawn in each training canvas's partner (for the tokenizer's
                code-consistency loss); 0: no partners.
            val_size: canvases in the fixed validation set.
            seed: data seed; train and val draw from different streams.
            num_workers: DataLoader worker processes.
        """
        super().__init__()
        self.save_hyperparameters()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_set = SpriteImages(train_size, seed, "train", train_density, train_partner_redraw)
        self.val_set = SpriteImages(val_size, seed, "val")

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, num_workers=self.num_workers, drop_last=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, num_workers=self.num_workers)


def _adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1.5e-3)


class VQTokenizerModule(LightningModule):
    """Trains a diffusers ``VQModel``: reconstruction (MSE + L1), VQ codebook and commitment losses, and code
    consistency.

    Consistency: where a batch has partner canvases, a cell the two canvases share must get the same code in both,
    so that a cell's code depends on the cell alone (a world model can then copy unchanged cells token for token).

    Codebook upkeep, every ``restart_every`` steps after the optimiser step. During the first ``restart_fraction``
    of the run, codes left unused are moved onto random encoder outputs (the usual cure for codebook collapse,
    Dhariwal et al. 2020, Jukebox). Restarts land inside existing clusters and split one content over several
    near-identical codes, so afterwards such near-duplicates are merged instead: all but the lowest-indexed are
    parked far away (unused from then on). At the end of fit each parked code becomes a copy of the code it was
    merged into, so it decodes to the same content while ``argmin`` (first index on ties) never picks it, and the
    model is written with ``save_pretrained`` to ``export_dir`` (atomically).
    """

    def __init__(
        self,
        block_out_channels: tuple[int, ...] = (16, 32, 32, 32),
        latent_channels: int = 16,
        num_vq_embeddings: int = 64,
        vq_embed_dim: int = 8,
        norm_num_groups: int = 8,
        image_size: int = 32,
        beta: float = 0.25,
        foreground_weight: float = 4.0,
        consistency_weight: float = 1.0,
        restart_every: int = 50,
        restart_fraction: float = 0.5,
        merge_ratio: float = 0.05,
        export_dir: str | None = None,
        optimizer: OptimizerCallable = _adam,
    ) -> None:
        """
        Args:
            block_out_channels: channels per resolution; ``len - 1`` stride-2 downsamples (4 blocks: 8×).
            latent_channels: channels of the encoder output before the 1×1 projection to ``vq_embed_dim``.
            num_vq_embeddings: codebook size K (the number of image tokens in ``TokenFWM``'s vocabulary).
            vq_embed_dim: dimension of a codebook vector.
            norm_num_groups: GroupNorm groups; divides every entry of ``block_out_channels``.
            image_size: training image side in pixels (stored in the VQ config as ``sample_size``).
            beta: weight of the commitment loss ``|z_e - sg(z_q)|²``.
            foreground_weight: extra reconstruction weight of pixels on or next to a shape (sprites cover a small
                part of the canvas; unweighted, the decoder settles on blurry shapes that ``parse`` misreads).
            consistency_weight: weight of the code-consistency loss: the commitment of each cell's encoder output to
                the codebook vector its partner canvas got for the same cell, where the two canvases share it.
            restart_every: steps between dead-code restarts; 0 turns restarts off.
            restart_fraction: share of the run's steps during which unused codes are restarted; merges follow.
            merge_ratio: used codes closer than this × the median distance between used codes are merged; 0 turns
                merging off.
            export_dir: where ``VQModel.save_pretrained`` writes the trained tokenizer at the end of fit.
            optimizer: optimiser factory over the VQ's parameters; its learning rate decays on a cosine to 3% over
                the run's optimiser steps.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        blocks = len(block_out_channels)
        self.vq = VQModel(
            block_out_channels=tuple(block_out_channels),
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            latent_channels=latent_channels,
            num_vq_embeddings=num_vq_embeddings,
            vq_embed_dim=vq_embed_dim,
            norm_num_groups=norm_num_groups,
            layers_per_block=1,
            mid_block_add_attention=False,  # 16 latent cells need no attention, and it would double the size
            sample_size=image_size,
        )
        self.beta, self.foreground_weight, self.consistency_weight = beta, foreground_weight, consistency_weight
        self.restart_every, self.restart_fraction, self.merge_ratio = restart_every, restart_fraction, merge_ratio
        self.export_dir = export_dir
        self.optimizer = optimizer
        self.register_buffer("code_usage", torch.zeros(num_vq_embeddings), persistent=False)
        # merged_into[k]: the code that k was merged into, or -1. Persistent: a resumed run must not lose it.
        self.register_buffer("merged_into", torch.full((num_vq_embeddings,), -1, dtype=torch.long))
        self._last_z_e: Tensor | None = None

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` → reconstruction ``(B, 3, H, W)`` in ``[-1, 1]`` (unclamped),
        encoder output ``z_e (B, D, h, w)``, quantised ``z_q (B, D, h, w)`` (no straight-through) and codes ``(B*h*w,)``.
        """
        z_e = self.vq.encode(images * 2 - 1).latents
        _, _, (_, _, codes) = self.vq.quantize(z_e)
        b, d, h, w = z_e.shape
        z_q = self.vq.quantize.embedding(codes).view(b, h, w, d).permute(0, 3, 1, 2)
        z_st = z_e + (z_q - z_e).detach()  # straight-through: decoder gradients flow to the encoder
        recon = self.vq.decode(z_st, force_not_quantize=True).sample
        return recon, z_e, z_q, codes

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        images = batch["image"]
        recon, z_e, z_q, codes = self(images)
        recon_loss = foreground_weighted_recon_loss(recon, images, self.foreground_weight)
        codebook_loss = F.mse_loss(z_q, z_e.detach())
        commitment_loss = F.mse_loss(z_e, z_q.detach())
        losses = {"vq/recon": recon_loss, "vq/codebook": codebook_loss, "vq/commitment": commitment_loss}
        loss = recon_loss + codebook_loss + self.beta * commitment_loss
        if "partner" in batch and self.consistency_weight:
            losses["vq/consistency"] = self._consistency_loss(z_e, batch["partner"], batch["shared"])
            loss = loss + self.consistency_weight * losses["vq/consistency"]
        self.code_usage += torch.bincount(codes, minlength=self.code_usage.numel())
        self._last_z_e = z_e.detach()
        self.log_dict(losses, prog_bar=True, batch_size=images.shape[0])
        return loss

    def _consistency_loss(self, z_e: Tensor, partner: Tensor, shared: Tensor) -> Tensor:
        """Commitment of ``z_e (B, D, h, w)`` to the codes the partner canvas got for the ``shared (B, h, w)`` cells."""
        if shared.shape != z_e.shape[:1] + z_e.shape[2:]:
            raise ValueError(f"shared cells {tuple(shared.shape)} do not match the code grid {tuple(z_e.shape[2:])}")
        with torch.no_grad():
            _, _, (_, _, partner_codes) = self.vq.quantize(self.vq.encode(partner * 2 - 1).latents)
        target = self.vq.quantize.embedding.weight[partner_codes].view(*shared.shape, -1)  # (B, h, w, D), no grad
        # Bounded like the commitment term (a target, not a distance between two free latents), so the latents
        # cannot collapse or blow up to satisfy it.
        return (z_e.permute(0, 2, 3, 1)[shared] - target[shared]).pow(2).mean()

    @override
    def on_train_batch_end(self, outputs: object, batch: dict[str, Tensor], batch_idx: int) -> None:
        # After the optimiser step, so a moved code is not then shifted by the gradient it had before the move.
        if not self.restart_every or self.global_step % self.restart_every:
            return
        if self.global_step <= self.restart_fraction * self.trainer.estimated_stepping_batches:
            self._restart_dead_codes(self._last_z_e)
        elif self.merge_ratio:
            self._merge_duplicate_codes()
        self.code_usage.zero_()

    @torch.no_grad()
    def _restart_dead_codes(self, z_e: Tensor) -> None:
        """Move codes unused since the last restart onto random encoder outputs ``z_e (B, D, h, w)``."""
        # Under DDP every rank must make the same move, so usage is summed and rank 0's candidates broadcast.
        usage = self.trainer.strategy.reduce(self.code_usage, reduce_op="sum")
        dead = (usage == 0).nonzero().squeeze(-1)
        self.log("vq/dead_codes", float(dead.numel()), batch_size=1)
        if dead.numel():
            candidates = z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])
            picks = candidates[torch.randint(len(candidates), (dead.numel(),), device=candidates.device)]
            picks = self.trainer.strategy.broadcast(picks, src=0)
            self.vq.quantize.embedding.weight[dead] = picks

    @torch.no_grad()
    def _merge_duplicate_codes(self) -> None:
        """Park all but the lowest-indexed of each group of near-identical used codes far from every latent."""
        usage = self.trainer.strategy.reduce(self.code_usage, reduce_op="sum")
        used = (usage > 0).nonzero().squeeze(-1)  # ascending code indices
        if used.numel() < 2:
            return
        weight = self.vq.quantize.embedding.weight
        distance = torch.cdist(weight[used], weight[used])  # (U, U)
        pairs = torch.triu_indices(len(used), len(used), 1, device=used.device)
        close = distance < self.merge_ratio * distance[pairs[0], pairs[1]].median()
        # Single linkage: each code takes the lowest position it is transitively close to (close is reflexive).
        group = torch.arange(len(used), device=used.device)
        for _ in range(len(used)):
            lowest = torch.where(close, group[None, :], len(used)).amin(1)
            if torch.equal(lowest, group):
                break
            group = lowest
        merged = group != torch.arange(len(used), device=used.device)
        self.merged_into[used[merged]] = used[group[merged]]
        # Far beyond every latent (the same on every rank): parked codes are never picked again while training.
        weight[used[merged]] = weight.detach().abs().max() * 1e3
        self.log("vq/merged_codes", float(merged.sum()), batch_size=1)

    def finalize_codebook(self) -> None:
        """Turn each parked code into a copy of the code it was merged into (following chains of merges)."""
        weight = self.vq.quantize.embedding.weight
        with torch.no_grad():
            for code in (self.merged_into >= 0).nonzero().squeeze(-1).tolist():
                target = code
                while self.merged_into[target] >= 0:
                    target = int(self.merged_into[target])
                weight[code] = weight[target]

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        images = batch["image"]
        recon, _, _, codes = self(images)
        recon = ((recon + 1) / 2).clamp(0, 1)
        states = [sprites.parse(x) for x in images.cpu()]
        for state, row in zip(states, codes.view(len(states), -1).tolist()):
            for content, code in zip(cell_contents(state), row):
                self._val_code_counts[content][code] += 1
        # Inputs are renders, so parse(input) is the true state (parse ∘ render is exact).
        hits = [sprites.parse(r) == state for r, state in zip(recon.cpu(), states)]
        state_acc = torch.tensor(hits, dtype=torch.float32).mean()
        size = images.shape[0]
        self.log("val/vq_state_acc", state_acc, prog_bar=True, batch_size=size, sync_dist=True)
        self.log("val/vq_l1", (recon - images).abs().mean(), batch_size=size, sync_dist=True)

    @override
    def on_validation_epoch_start(self) -> None:
        self._val_code_counts: dict[tuple[str, str] | None, Counter[int]] = defaultdict(Counter)

    @override
    def on_validation_epoch_end(self) -> None:
        counts = self._val_code_counts.values()
        total = sum(sum(c.values()) for c in counts)
        if total:  # as sprite_code_purity: cells whose code is their content's most common code
            self.log("val/vq_code_purity", sum(c.most_common(1)[0][1] for c in counts) / total, prog_bar=True)

    @override
    def configure_optimizers(self) -> dict:
        # Decaying the rate is what turns blurry shapes into ones parse reads right; a constant rate plateaus.
        return cosine_to_3_percent(self.optimizer(self.vq.parameters()), self.trainer.estimated_stepping_batches)

    @override
    def on_fit_end(self) -> None:
        self.finalize_codebook()
        if self.export_dir is not None and self.trainer.is_global_zero:
            save_pretrained_atomically(self.vq, self.export_dir)


def foreground_weighted_recon_loss(recon: Tensor, images: Tensor, foreground_weight: float) -> Tensor:
    """Mean of (MSE + L1) between ``recon`` in ``[-1, 1]`` and ``images`` in ``[0, 1]``, each pixel on or next to a
    shape weighted ``1 + foreground_weight`` (sprites cover a small part of the canvas)."""
    target = images * 2 - 1
    lit = (images.amax(1, keepdim=True) > 0.5).float()  # (B, 1, H, W)
    # Dilated by one pixel, so that light spilling past an edge costs as much as light missing inside it:
    # weighting only lit pixels would teach the decoder to over-light, and circles would turn into squares.
    weight = 1 + foreground_weight * F.max_pool2d(lit, 3, stride=1, padding=1)
    return (weight * ((recon - target) ** 2 + (recon - target).abs())).mean()


def cosine_to_3_percent(optimizer: torch.optim.Optimizer, total_steps: float) -> dict:
    """Lightning's optimiser config: ``optimizer``'s rate decays on a cosine to 3% over ``total_steps``, per step."""
    total = max(int(total_steps), 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.03 + 0.97 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def save_pretrained_atomically(model: ModelMixin, export_dir: str | Path) -> None:
    """``model.save_pretrained(export_dir)`` through a temporary sibling folder, so a crash never leaves half a model."""
    target = Path(export_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(tmp)
    _make_readable(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}-old-{tmp.name}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)


def _make_readable(folder: Path) -> None:
    """``mkdtemp`` (and some writers) create owner-only entries; a shipped model must be readable by all."""
    folder.chmod(0o755)
    for f in folder.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
