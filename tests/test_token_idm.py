"""TokenIDM: the IDM on a token-FWM folder — prompt layout, sampling, scoring identities, learning, save/load, sharing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swirl_vl.models.token_fwm import TokenFWM
from swirl_vl.models.token_idm import TokenIDM
from tests.sprite_oracles import sprite_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("token_idm") / "tiny"
    TokenIDM(str(path), build_tiny=True, seed=0)
    return path


@pytest.fixture
def idm(folder: Path) -> TokenIDM:
    torch.manual_seed(0)
    return TokenIDM.from_pretrained(folder).eval()


def _sft(idm: TokenIDM, x: torch.Tensor, y: torch.Tensor, z: list[str], steps: int, lr: float = 3e-3) -> None:
    opt = torch.optim.Adam([p for p in idm.parameters() if p.requires_grad], lr=lr)
    idm.train()
    for _ in range(steps):
        opt.zero_grad()
        idm.sft_loss(x, y, z).backward()
        opt.step()
    idm.eval()


def test_prompt_layout(idm: TokenIDM) -> None:
    x, y, _ = sprite_pairs(2)
    ids, mask = idm.prompt_ids(x, y)
    L = idm.num_image_tokens
    bos = idm.tokenizer.bos_token_id
    assert ids.shape == mask.shape == (2, 1 + 2 * L + 4) and mask.all()
    row = ids[0].tolist()
    assert row[:2] == [bos, idm.boi_id] and row[2 + L : 4 + L] == [idm.eoi_id, idm.boi_id] and row[-1] == idm.eoi_id
    codes = idm.encode_images(torch.cat([x, y]))
    assert torch.equal(ids[:, 2 : 2 + L], idm.code_token_ids[codes[:2]])
    assert torch.equal(ids[:, 4 + L : 4 + 2 * L], idm.code_token_ids[codes[2:]])


def test_sample_shapes_group_order_and_ratio_one(idm: TokenIDM) -> None:
    x, y, _ = sprite_pairs(2)
    G = 3
    rollout = idm.sample(x, y, num_samples=G, max_new_tokens=12)
    N = 2 * G
    assert rollout.group_size == G and len(rollout.texts) == N
    assert rollout.old_logprobs.shape == rollout.mask.shape and rollout.mask.shape[0] == N
    assert rollout.mask.shape[1] <= 12 and rollout.mask.dtype == torch.bool
    ids = rollout.context["input_ids"]
    P = idm.prompt_ids(x, y)[0].shape[1]
    assert ids.shape == (N, P + rollout.mask.shape[1])
    prompts = ids[:, :P]
    assert torch.equal(prompts[:G], prompts[0].expand(G, -1)) and not torch.equal(prompts[0], prompts[G])
    # An untrained model puts most of its mass on the image codes: only the restriction keeps them out.
    completion = ids[:, P:]
    assert not torch.isin(completion[rollout.mask], idm.non_text_ids).any()
    logp, mask = idm.rollout_logprobs(rollout)
    assert logp.requires_grad and torch.equal(mask, rollout.mask)
    torch.testing.assert_close(logp, rollout.old_logprobs, rtol=0, atol=1e-6)
    assert torch.isfinite(logp[mask]).all()


def test_greedy_needs_one_sample(idm: TokenIDM) -> None:
    x, y, _ = sprite_pairs(1)
    with pytest.raises(ValueError, match="num_samples"):
        idm.sample(x, y, num_samples=2, greedy=True)


def test_sft_raises_likelihood_and_greedy_stops_at_eos(idm: TokenIDM) -> None:
    x, y, z = sprite_pairs(4)
    before = idm.log_likelihood(x, y, z)
    _sft(idm, x, y, z, steps=40)
    after = idm.log_likelihood(x, y, z)
    assert before.shape == after.shape == (4,)
    assert (after > before + 1.0).all(), (before, after)
    rollout = idm.sample(x, y, greedy=True, max_new_tokens=24)
    completion = rollout.context["input_ids"][:, -rollout.mask.shape[1] :]
    lengths = rollout.mask.sum(1)
    assert (lengths < 24).all(), "a trained model ends its actions"
    last = completion.gather(1, (lengths - 1)[:, None]).squeeze(1)
    assert (last == idm.eos_token_id).all(), "the mask keeps the end-of-sequence token and nothing after it"
    assert (completion[~rollout.mask] == idm.pad_id).all()


def test_save_load_round_trip_in_the_token_fwm_format(idm: TokenIDM, tmp_path: Path) -> None:
    x, y, z = sprite_pairs(3)
    _sft(idm, x, y, z, steps=2)  # differ from the folder it was loaded from
    idm.save_pretrained(tmp_path / "saved")
    loaded = TokenIDM.from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(loaded.log_likelihood(x, y, z), idm.log_likelihood(x, y, z))
    TokenFWM.from_pretrained(tmp_path / "saved")  # the same folder is a TokenFWM


def test_sharing_uses_the_fwm_tensors(folder: Path) -> None:
    fwm = TokenFWM.from_pretrained(folder).eval()
    idm = TokenIDM.sharing(fwm)
    assert idm.lm is fwm.lm and idm.vq is fwm.vq and idm.tokenizer is fwm.tokenizer
    fwm_params = dict(fwm.named_parameters())
    for name, p in idm.named_parameters():
        assert p.data_ptr() == fwm_params[name].data_ptr(), name
    x, y, z = sprite_pairs(2)
    fwm_before = fwm.log_likelihood(x, z, y)
    _sft(idm, x, y, z, steps=1)
    assert not torch.allclose(fwm.log_likelihood(x, z, y), fwm_before), "an IDM step must move the shared FWM"
