"""Action / image sensitivity: known answers on sprite oracles, and both FWM backends plus the tiny VLM IDM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swirl_vl.eval.sensitivity import fwm_action_sensitivity, idm_image_sensitivity, partner_index
from swirl_vl.models.diffusion_fwm import DiffusionFWM
from swirl_vl.models.idm import VLMIDM
from swirl_vl.models.tiny_diffusion import build_tiny_instruct_pix2pix
from swirl_vl.models.token_fwm import TokenFWM
from tests.sprite_oracles import OracleFWM, OracleIDM, sprite_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def _is_binary_or_nan(values: torch.Tensor) -> bool:
    known = values[~values.isnan()]
    return bool(((known == 0) | (known == 1)).all())


def test_partner_index_is_a_derangement():
    for b in (2, 3, 8):
        partner = partner_index(b)
        assert sorted(partner.tolist()) == list(range(b))
        assert (partner != torch.arange(b)).all()


def test_oracles_score_one_blind_models_score_zero():
    batch = sprite_batch(6, seed=1)
    x, y, z = batch["x"], batch["y"], batch["action"]
    assert len(set(z)) == 6
    torch.testing.assert_close(fwm_action_sensitivity(OracleFWM(), x, z, y), torch.ones(6))
    torch.testing.assert_close(idm_image_sensitivity(OracleIDM(), x, y, z), torch.ones(6))
    # A model that ignores its condition ties every comparison, and a tie is no evidence of sensitivity.
    torch.testing.assert_close(fwm_action_sensitivity(OracleFWM(blind=True), x, z, y), torch.zeros(6))
    torch.testing.assert_close(idm_image_sensitivity(OracleIDM(blind=True), x, y, z), torch.zeros(6))


def test_pairs_without_a_distinct_partner_are_left_out():
    batch = sprite_batch(4, seed=2)
    x, y, z = batch["x"].clone(), batch["y"].clone(), list(batch["action"])
    x[1], y[1], z[1] = x[0], y[0], z[0]  # pair 0's partner has the same action: no answer for pair 0
    z[3] = ""  # unknown action: no answer for pair 3
    got = fwm_action_sensitivity(OracleFWM(), x, z, y)
    assert got[0].isnan() and got[3].isnan() and got[1] == 1 and got[2] == 1
    y_same = y.clone()
    y_same[2] = y_same[1]  # pair 1's partner shows the same next image
    got = idm_image_sensitivity(OracleIDM(), x, y_same, z)
    assert got[1].isnan() and got[3].isnan()
    assert fwm_action_sensitivity(OracleFWM(), x[:1], z[:1], y[:1]).isnan().all()  # a batch of one has no partner


@pytest.fixture(scope="module")
def diffusion_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_instruct_pix2pix(tmp_path_factory.mktemp("diffusion") / "tiny", seed=0)


def test_diffusion_fwm_shares_elbo_draws_between_the_two_actions(diffusion_path: Path):
    fwm = DiffusionFWM(str(diffusion_path), elbo_draws=2).eval()
    batch = sprite_batch(4, seed=3)
    x, y, z = batch["x"], batch["y"], batch["action"]
    first = fwm_action_sensitivity(fwm, x, z, y)
    assert first.shape == (4,) and _is_binary_or_nan(first) and not first.isnan().any()
    state = torch.get_rng_state()
    torch.testing.assert_close(fwm_action_sensitivity(fwm, x, z, y), first)  # seeded: reproducible
    assert torch.equal(torch.get_rng_state(), state)  # and the caller's RNG is left alone
    # Blind the UNet to the text (the encoder's output is all zeros): with the same (t, ε) draws for the true
    # and the other action, the two ELBO estimates are equal to the bit, so every pair ties and scores 0.
    # Independent draws would make them differ at random and score about one half.
    final_norm = next(m for n, m in fwm.text_encoder.named_modules() if n.endswith("final_layer_norm"))
    with torch.no_grad():
        final_norm.weight.zero_()
        final_norm.bias.zero_()
    torch.testing.assert_close(fwm_action_sensitivity(fwm, x, z, y), torch.zeros(4))


def test_token_fwm_and_vlm_idm_give_one_answer_per_pair(tmp_path: Path):
    fwm = TokenFWM(str(tmp_path / "fwm"), build_tiny=True, seed=0).eval()
    idm = VLMIDM(str(tmp_path / "idm"), build_tiny="llava").eval()
    batch = sprite_batch(4, seed=4)
    x, y, z = batch["x"], batch["y"], batch["action"]
    for got in (fwm_action_sensitivity(fwm, x, z, y), idm_image_sensitivity(idm, x, y, z)):
        assert got.shape == (4,) and _is_binary_or_nan(got) and not got.isnan().any()
    # The token FWM's likelihood is exact: the answer does not depend on the seed of the (absent) draws.
    torch.testing.assert_close(fwm_action_sensitivity(fwm, x, z, y, seed=1), fwm_action_sensitivity(fwm, x, z, y))
