"""TokenFWM (causal LM over text + VQ codes) and its sprite-world image tokenizer."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import VQModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from swirl_vl.models.token_fwm import TokenFWM, image_token
from swirl_vl.models.vq import (
    SHIPPED_SPRITE_VQ,
    SpriteImageDataModule,
    VQTokenizerModule,
    sprite_roundtrip_accuracy,
)
from tests.sprite_oracles import sprite_pairs


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("token_fwm") / "tiny"
    TokenFWM(str(path), build_tiny=True, seed=0)
    return path


@pytest.fixture
def fwm(folder: Path) -> TokenFWM:
    torch.manual_seed(0)
    return TokenFWM.from_pretrained(folder).eval()


def test_tiny_folder_loads_with_plain_hf_loaders(folder: Path, fwm: TokenFWM) -> None:
    lm = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vq = VQModel.from_pretrained(folder / "vq")
    assert lm.config.vocab_size == len(tokenizer)
    assert image_token(vq.config.num_vq_embeddings - 1) in tokenizer.get_vocab()
    assert fwm.num_image_tokens == 16 and fwm.grid == (4, 4)
    assert not any(p.requires_grad for p in fwm.vq.parameters())
    fwm.train()
    assert fwm.lm.training and not fwm.vq.training


def test_missing_checkpoint_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="build_tiny"):
        TokenFWM(str(tmp_path / "absent"))


def test_sample_shapes_group_order_and_ratio_one(fwm: TokenFWM) -> None:
    x, _, z = sprite_pairs(2)
    G = 3
    rollout = fwm.sample(x, z, num_samples=G)
    N, L = 2 * G, 16
    assert rollout.group_size == G
    assert rollout.images.shape == (N, 3, 32, 32)
    assert 0 <= rollout.images.min() and rollout.images.max() <= 1
    assert rollout.old_logprobs.shape == rollout.mask.shape == (N, L) and rollout.mask.all()
    ids = rollout.context["input_ids"]
    assert (fwm.token_to_code[ids[:, -L:]] >= 0).all(), "only image-code tokens may be generated"
    prompts = ids[:, :-L]
    assert torch.equal(prompts[:G], prompts[0].expand(G, -1)) and not torch.equal(prompts[0], prompts[G])
    logp, mask = fwm.rollout_logprobs(rollout)
    assert logp.requires_grad
    torch.testing.assert_close(logp.detach(), rollout.old_logprobs)
    assert torch.equal(mask, rollout.mask)


def test_greedy_is_deterministic(fwm: TokenFWM) -> None:
    x, _, z = sprite_pairs(2)
    a, b = fwm.sample(x, z, greedy=True), fwm.sample(x, z, greedy=True)
    assert torch.equal(a.context["input_ids"], b.context["input_ids"])
    with pytest.raises(ValueError, match="num_samples=1"):
        fwm.sample(x, z, num_samples=2, greedy=True)


def test_log_likelihood_is_minus_sft_loss_and_ignores_padding(fwm: TokenFWM) -> None:
    x, y, z = sprite_pairs(3)
    z[1] = "add a red square at row 1 column 2 and then some much longer padding text"
    ll = fwm.log_likelihood(x, z, y)
    assert ll.shape == (3,) and torch.isfinite(ll).all() and (ll < 0).all()
    loss = fwm.sft_loss(x[:1], z[:1], y[:1])
    assert torch.isfinite(loss)
    torch.testing.assert_close(ll[0], -loss.detach())
    # Alone (no left padding) or batched next to a longer action: the same likelihood.
    torch.testing.assert_close(fwm.log_likelihood(x[:1], z[:1], y[:1]), ll[:1], atol=1e-5, rtol=1e-5)


def test_sft_steps_raise_target_likelihood(fwm: TokenFWM) -> None:
    x, y, z = sprite_pairs(8)
    before = fwm.log_likelihood(x, z, y).mean()
    optimizer = torch.optim.Adam([p for p in fwm.parameters() if p.requires_grad], lr=3e-3)
    fwm.train()
    for _ in range(5):
        optimizer.zero_grad()
        fwm.sft_loss(x, z, y).backward()
        optimizer.step()
    fwm.eval()
    assert fwm.log_likelihood(x, z, y).mean() > before + 0.5


def test_save_load_round_trip(fwm: TokenFWM, tmp_path: Path) -> None:
    x, y, z = sprite_pairs(2)
    fwm.save_pretrained(tmp_path / "saved")
    loaded = TokenFWM.from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(loaded.log_likelihood(x, z, y), fwm.log_likelihood(x, z, y), atol=0, rtol=0)


def test_shipped_vq_round_trips_sprite_states() -> None:
    size = sum(f.stat().st_size for f in SHIPPED_SPRITE_VQ.iterdir())
    assert size < 2 * 2**20, f"shipped VQ is {size} bytes"
    vq = VQModel.from_pretrained(SHIPPED_SPRITE_VQ).eval()
    assert sprite_roundtrip_accuracy(vq, num_states=200, seed=123) >= 0.99


def test_vq_training_exports_a_loadable_vq(tmp_path: Path) -> None:
    module = VQTokenizerModule(restart_every=1, export_dir=str(tmp_path / "vq"))
    data = SpriteImageDataModule(batch_size=4, train_size=8, val_size=4)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, barebones=True)
    trainer.fit(module, data)
    vq = VQModel.from_pretrained(tmp_path / "vq")
    assert vq.config.num_vq_embeddings == 64 and vq.config.block_out_channels == [16, 32, 32, 32]
    assert 0 <= sprite_roundtrip_accuracy(vq, num_states=4) <= 1


@pytest.mark.parametrize("merge_ratio", [0.0, 1e3])
def test_merge_ratio_merges_codes_into_copies(merge_ratio: float) -> None:
    module = VQTokenizerModule(restart_every=1, restart_fraction=0.0, merge_ratio=merge_ratio)
    data = SpriteImageDataModule(batch_size=8, train_size=16, val_size=4)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, barebones=True)
    trainer.fit(module, data)
    merged = (module.merged_into >= 0).nonzero().squeeze(-1)
    assert (merged.numel() > 0) == (merge_ratio > 0)
    weight = module.vq.quantize.embedding.weight
    for code in merged.tolist():  # after fit: a copy of a lower-indexed code, which argmin picks on ties
        target = int(module.merged_into[code])
        assert target < code and torch.equal(weight[code], weight[target])


def test_gradient_checkpointing_keeps_the_gradients(folder: Path) -> None:
    """With gradient checkpointing (rollouts scored as full copies of each prompt) and without it (each group's
    prompt run once), a rollout's log-probs and their gradients agree."""
    x, _, z = sprite_pairs(2)
    torch.manual_seed(0)
    rollout = TokenFWM.from_pretrained(folder).sample(x, z, num_samples=3)
    grads = []
    for checkpointing in (False, True):
        fwm = TokenFWM(str(folder), gradient_checkpointing=checkpointing).train()
        assert fwm.lm.is_activation_checkpointing == checkpointing
        logp, _ = fwm.rollout_logprobs(rollout)
        logp.sum().backward()
        grads.append([p.grad for p in fwm.lm.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed, atol=1e-5, rtol=1e-4)


def test_head_rows_gives_the_full_heads_columns_and_their_gradients(fwm: TokenFWM) -> None:
    from swirl_vl.models.generation import head_rows

    ids = torch.randint(0, len(fwm.tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    rows = fwm.code_token_ids
    weight = fwm.lm.get_output_embeddings().weight
    full = fwm.lm(input_ids=ids).logits[..., rows]
    (full_grad,) = torch.autograd.grad(full.square().sum(), weight)
    with head_rows(fwm.lm, rows):
        kept = fwm.lm(input_ids=ids).logits
    (kept_grad,) = torch.autograd.grad(kept.square().sum(), weight)
    assert kept.shape == (2, 9, len(rows))
    torch.testing.assert_close(kept, full)
    torch.testing.assert_close(kept_grad, full_grad)
    assert fwm.lm(input_ids=ids).logits.shape[-1] == weight.shape[0]  # the whole head is back after the block


def test_a_groups_repeated_samples_score_once_with_the_same_logprobs_and_gradients(fwm: TokenFWM) -> None:
    """A rollout group's identical samples run their image tail once; log-probs and gradients equal those of every
    row scored in full, and the decoded images equal the codes' own decoding."""
    x, _, z = sprite_pairs(2)
    rollout = fwm.sample(x, z, num_samples=4)
    ids = rollout.context["input_ids"].clone()
    S = fwm.image_length
    ids[1:3, -S:] = ids[0, -S:]  # group 0: rows 1 and 2 repeat row 0
    mask = rollout.context["attention_mask"]
    fwm.train()
    results = []
    rows: list[int] = []
    hook = fwm.lm.register_forward_pre_hook(
        lambda _, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    for group_size in (1, rollout.group_size):
        fwm.zero_grad()
        logp = fwm.code_logprobs(ids, mask, rollout.temperature, group_size)
        logp.sum().backward()
        results.append((logp.detach(), [p.grad.clone() for p in fwm.parameters() if p.grad is not None]))
    hook.remove()
    assert rows[0] == 8 and rows[1] == 2 and rows[2] <= 6  # every row; the 2 prompts; the distinct tails
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    assert len(results[0][1]) == len(results[1][1]) > 0
    for full, shared in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(full, shared, atol=1e-5, rtol=1e-4)
    codes = fwm.image_codes(rollout.context["input_ids"][:, -S:])
    torch.testing.assert_close(rollout.images, fwm.decode_codes(codes), atol=1e-6, rtol=1e-5)


def test_sampling_keeps_50_codes_by_default_and_every_code_without_top_k(fwm: TokenFWM) -> None:
    """transformers 5 fills an unset ``top_k`` with 50: the FWM's default says so, and None (or 0) turns it off. One
    prompt, 256 draws of its first code at temperature 2 from the untrained model over its 64 codes: at most 50
    distinct codes under top-k 50, more without it."""
    x, _, z = sprite_pairs(1)
    firsts = {}
    for top_k in (50, None, 0):
        torch.manual_seed(0)
        with torch.no_grad():
            rollout = fwm.sample(x, z, num_samples=256, temperature=2.0, top_k=top_k, top_p=1.0)
        firsts[top_k] = rollout.context["input_ids"][:, -fwm.image_length].tolist()
    assert len(set(firsts[50])) <= 50 < len(set(firsts[None]))
    assert firsts[None] == firsts[0]
