"""The image-tokenizer seam: each implementation codes and decodes as its library's own model does, frozen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Emu3VQVAE, Emu3VQVAEConfig, JanusVQVAE, JanusVQVAEConfig

from swirl_vl.models.image_tokenizer import CodeCache, DiffusersVQ, Emu3VQ, JanusVQ, load_image_tokenizer
from swirl_vl.models.vq import SHIPPED_SPRITE_VQ, vq_decode, vq_encode


def _janus(size: int) -> JanusVQVAE:
    config = JanusVQVAEConfig(
        embed_dim=8,
        num_embeddings=64,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1, 1],
        num_res_blocks=1,
        num_patches=size // 2,
        projection_dim=16,
        image_token_embed_dim=16,
    )
    return JanusVQVAE(config).eval()


def _emu3() -> Emu3VQVAE:
    config = Emu3VQVAEConfig(
        codebook_size=64,
        embed_dim=4,
        latent_channels=4,
        num_res_blocks=1,
        attn_resolutions=[],
        channel_multiplier=[1, 2],
        temporal_downsample_factor=2,
        base_channels=32,
        hidden_size=64,
        num_attention_heads=1,
    )
    return Emu3VQVAE(config).eval()


@pytest.mark.parametrize("family", ["janus", "emu3"])
def test_codes_and_images_equal_the_librarys_own(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _janus(16) if family == "janus" else _emu3()
    model.save_pretrained(tmp_path / "vq")
    tokenizer = load_image_tokenizer(tmp_path / "vq")
    assert isinstance(tokenizer, JanusVQ if family == "janus" else Emu3VQ) and tokenizer.num_codes == 64
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    grid = tokenizer.grid(16)
    if family == "janus":
        own_codes = model.encode(images * 2 - 1).image_tokens.view(2, -1)
        own_images = model.decode(own_codes)
    else:
        own_codes = torch.stack(model.encode(images * 2 - 1, torch.tensor([[16, 16]] * 2)).image_tokens).view(2, -1)
        own_images = model.decode(own_codes.view(2, *grid))
    codes = tokenizer.encode(images)
    assert codes.unique().numel() > 1 and torch.equal(codes, own_codes)
    torch.testing.assert_close(tokenizer.decode(codes, grid), ((own_images.float() + 1) / 2).clamp(0, 1))
    tokenizer.train()
    assert not tokenizer.training and not tokenizer.model.training
    assert not any(p.requires_grad for p in tokenizer.parameters())


def test_the_sprite_vq_codes_as_before_and_unknown_folders_are_named(tmp_path: Path) -> None:
    tokenizer = load_image_tokenizer(SHIPPED_SPRITE_VQ)
    assert isinstance(tokenizer, DiffusersVQ)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    codes = tokenizer.encode(images)
    assert torch.equal(codes, vq_encode(tokenizer.model, images))
    torch.testing.assert_close(tokenizer.decode(codes, (4, 4)), vq_decode(tokenizer.model, codes, (4, 4)))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="chameleon_vqgan"):
        load_image_tokenizer(tmp_path / "odd")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_image_tokenizer(tmp_path / "missing")


def test_images_seen_before_are_not_encoded_again(tmp_path: Path) -> None:
    tokenizer = load_image_tokenizer(SHIPPED_SPRITE_VQ)
    calls: list[int] = []
    encode = tokenizer._encode
    tokenizer._encode = lambda pixels: calls.append(len(pixels)) or encode(pixels)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    batch = torch.cat([images[:3], images[1:2]])  # one image twice
    first = tokenizer.encode(batch)
    assert calls == [4] and torch.equal(first, vq_encode(tokenizer.model, batch))
    seen = tokenizer.encode(images[[2, 0, 1, 0]])  # every image seen: nothing encoded
    assert calls == [4] and torch.equal(seen, first[[2, 0, 1, 0]])
    again = tokenizer.encode(images)  # three seen, one new: the batch is encoded whole, as its caller gave it
    assert calls == [4, 4] and torch.equal(again, vq_encode(tokenizer.model, images))
    assert tokenizer.encode(images[3:]).tolist() == again[3:].tolist() and calls == [4, 4]
    changed = images.clone()
    changed[0, 0, 0, 0] += 1e-6  # a different image, however close
    tokenizer.encode(changed[:1])
    assert calls == [4, 4, 1]

    tokenizer.load_state_dict(tokenizer.state_dict())  # new weights: nothing cached is trusted
    assert tokenizer.cache.size == 0
    tokenizer.cache.capacity = 2 * (16 + 16 * 4 + CodeCache.ENTRY_OVERHEAD)  # two images' codes: the oldest go
    tokenizer.encode(images[:3])
    assert len(tokenizer.cache._codes) == 2 and tokenizer.cache.get(CodeCache.keys(images[:1])[0]) is None
