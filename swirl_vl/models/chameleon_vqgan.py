"""Chameleon's VQGAN (``vqgan.ckpt`` + ``vqgan.yaml``, as Meta and Anole publish it) → a diffusers ``VQModel`` folder.

Chameleon, Anole and Liquid tokenize images with this VQGAN (8,192 codes, 16× downsampling: 1,024 codes for a
512-pixel image). Its checkpoint is a taming-transformers ``VQModel`` state dict; transformers' ``ChameleonVQVAE``
keeps only its encoder, so it cannot turn generated codes back into pixels. The same network is a diffusers
``VQModel``: the encoder and decoder keys map as diffusers maps latent-diffusion autoencoders
(``convert_ldm_vae_checkpoint``), and the codebook and 1×1 convolutions keep their names. The discriminator
(``loss.*``) is dropped. The converted folder loads with ``VQModel.from_pretrained`` and serves as ``vq_path``
of ``LiquidFWM`` and ``ChameleonFWM``.

    python -m swirl_vl.models.chameleon_vqgan anole/tokenizer/vqgan.ckpt anole/tokenizer/vqgan.yaml models/chameleon_vq
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import VQModel
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from swirl_vl.models.base import write_folder_atomically

VQGAN_DOWNLOAD = (
    "Chameleon's VQGAN (`hf download GAIR/Anole-7b-v0.1 tokenizer/vqgan.ckpt tokenizer/vqgan.yaml --local-dir "
    "anole`), convert the VQGAN (`python -m swirl_vl.models.chameleon_vqgan anole/tokenizer/vqgan.ckpt "
    "anole/tokenizer/vqgan.yaml PATH/vq`), or set build_tiny: true to write a tiny model there."
)
"""The download hint of the families that tokenize images with Chameleon's VQGAN."""

_KEPT = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.embedding.weight")


def vq_config(ddconfig: dict[str, Any], n_embed: int, embed_dim: int) -> dict[str, Any]:
    """``VQModel`` keyword arguments of a taming ``VQModel`` with this ``ddconfig`` and codebook."""
    if ddconfig.get("attn_resolutions"):
        raise ValueError(
            f"attention at resolutions {ddconfig['attn_resolutions']} is not supported (Chameleon's VQGAN has none)"
        )
    if ddconfig.get("double_z"):
        raise ValueError("double_z VQGANs are not supported (Chameleon's VQGAN has double_z: false)")
    mult = list(ddconfig["ch_mult"])
    return {
        "in_channels": ddconfig.get("in_channels", 3),
        "out_channels": ddconfig.get("out_ch", 3),
        "down_block_types": ("DownEncoderBlock2D",) * len(mult),
        "up_block_types": ("UpDecoderBlock2D",) * len(mult),
        "block_out_channels": tuple(ddconfig["ch"] * m for m in mult),
        "layers_per_block": ddconfig["num_res_blocks"],
        "latent_channels": ddconfig["z_channels"],
        "num_vq_embeddings": n_embed,
        "vq_embed_dim": embed_dim,
        "norm_num_groups": 32,
        "sample_size": ddconfig.get("resolution", 512),
    }


def convert_state_dict(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Taming ``VQModel`` keys → diffusers ``VQModel`` keys (``loss.*`` and other extras dropped)."""
    taming = {k: v for k, v in state_dict.items() if k.startswith(_KEPT)}
    converted = convert_ldm_vae_checkpoint(taming, config)
    converted["quantize.embedding.weight"] = taming["quantize.embedding.weight"]
    return converted


def convert_chameleon_vqgan(ckpt: str | Path, config_yaml: str | Path, out: str | Path) -> Path:
    """Read ``vqgan.ckpt`` / ``vqgan.yaml``, write the diffusers ``VQModel`` folder ``out`` atomically."""
    params = yaml.safe_load(Path(config_yaml).read_text())["model"]["params"]
    config = vq_config(params["ddconfig"], params["n_embed"], params["embed_dim"])
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as exn:
        raise ValueError(f"'{ckpt}' is not a readable VQGAN checkpoint ({type(exn).__name__}: {exn})") from exn
    state_dict = checkpoint.get("state_dict", checkpoint)
    model = VQModel(**config)
    missing, unexpected = model.load_state_dict(convert_state_dict(state_dict, config), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"'{ckpt}' does not match its config '{config_yaml}': missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return write_folder_atomically(out, model.save_pretrained)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m swirl_vl.models.chameleon_vqgan", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("ckpt", help="vqgan.ckpt (taming-transformers VQModel checkpoint)")
    parser.add_argument("config", help="vqgan.yaml beside it")
    parser.add_argument("out", help="folder to write the diffusers VQModel to (must not exist)")
    args = parser.parse_args(argv)
    if Path(args.out).exists():
        parser.error(f"{args.out} exists: choose a new folder")
    print(f"wrote {convert_chameleon_vqgan(args.ckpt, args.config, args.out)}")


if __name__ == "__main__":
    main()
