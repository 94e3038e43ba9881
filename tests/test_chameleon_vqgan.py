"""Chameleon's VQGAN checkpoint → diffusers VQModel: codes equal transformers' ChameleonVQVAE encoder's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from diffusers import VQModel
from transformers import ChameleonVQVAEConfig
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

from swirl_vl.models.chameleon_vqgan import convert_chameleon_vqgan, main
from swirl_vl.models.image_tokenizer import load_image_tokenizer

DDCONFIG = {
    "double_z": False,
    "z_channels": 32,
    "resolution": 32,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def taming_decoder(cfg: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights under taming-transformers' ``Decoder`` names and shapes (``up.{level}``, highest level
    applied first; ``num_res_blocks + 1`` blocks per level)."""
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, cin: int, cout: int, k: int) -> None:
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=generator) * 0.05
        sd[f"{name}.bias"] = torch.randn(cout, generator=generator) * 0.05

    def norm(name: str, c: int) -> None:
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=generator)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=generator)

    def resnet(name: str, cin: int, cout: int) -> None:
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    mult, ch = cfg["ch_mult"], cfg["ch"]
    block_in = ch * mult[-1]
    conv("decoder.conv_in", cfg["z_channels"], block_in, 3)
    resnet("decoder.mid.block_1", block_in, block_in)
    norm("decoder.mid.attn_1.norm", block_in)
    for part in ("q", "k", "v", "proj_out"):
        conv(f"decoder.mid.attn_1.{part}", block_in, block_in, 1)
    resnet("decoder.mid.block_2", block_in, block_in)
    for level in reversed(range(len(mult))):
        block_out = ch * mult[level]
        for b in range(cfg["num_res_blocks"] + 1):
            resnet(f"decoder.up.{level}.block.{b}", block_in, block_out)
            block_in = block_out
        if level:
            conv(f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, cfg["out_ch"], 3)
    return sd


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, ChameleonVQVAE]:
    """A tiny ``vqgan.ckpt`` (Lightning-style ``state_dict``, discriminator included) + ``vqgan.yaml``, whose encoder
    half is a seeded transformers ``ChameleonVQVAE`` (taming's key names)."""
    folder = tmp_path_factory.mktemp("anole")
    torch.manual_seed(0)
    encoder = ChameleonVQVAE(
        ChameleonVQVAEConfig(
            embed_dim=8,
            num_embeddings=64,
            latent_channels=DDCONFIG["z_channels"],
            base_channels=DDCONFIG["ch"],
            channel_multiplier=DDCONFIG["ch_mult"],
            num_res_blocks=DDCONFIG["num_res_blocks"],
            resolution=DDCONFIG["resolution"],
        )
    ).eval()
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    state.update(taming_decoder(DDCONFIG, torch.Generator().manual_seed(1)))
    state["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    torch.save({"state_dict": state, "epoch": 3}, folder / "vqgan.ckpt")
    config = {"model": {"params": {"embed_dim": 8, "n_embed": 64, "ddconfig": DDCONFIG}}}
    (folder / "vqgan.yaml").write_text(yaml.safe_dump(config))
    return folder / "vqgan.ckpt", folder / "vqgan.yaml", encoder


def test_converted_codes_equal_chameleons_encoder(published, tmp_path: Path) -> None:
    ckpt, config, encoder = published
    out = convert_chameleon_vqgan(ckpt, config, tmp_path / "vq")
    tokenizer = load_image_tokenizer(out)
    assert isinstance(tokenizer.model, VQModel) and tokenizer.num_codes == 64 and tokenizer.grid(32) == (8, 8)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    reference = encoder.encode(images * 2 - 1).image_tokens.view(3, -1)
    codes = tokenizer.encode(images)
    assert codes.unique().numel() > 1  # not a degenerate codebook
    assert torch.equal(codes, reference)
    decoded = tokenizer.decode(codes, (8, 8))
    assert decoded.shape == (3, 3, 32, 32) and torch.isfinite(decoded).all()


def test_the_cli_refuses_an_existing_folder_and_a_mismatched_config(published, tmp_path: Path) -> None:
    ckpt, config, _ = published
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit):
        main([str(ckpt), str(config), str(tmp_path / "taken")])
    wrong = yaml.safe_load(config.read_text())
    wrong["model"]["params"]["ddconfig"]["ch_mult"] = [1, 2, 2]
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(wrong))
    with pytest.raises((ValueError, RuntimeError)):
        convert_chameleon_vqgan(ckpt, tmp_path / "wrong.yaml", tmp_path / "vq")
    assert not (tmp_path / "vq").exists()
