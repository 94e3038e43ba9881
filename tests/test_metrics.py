import math

import pytest
import torch

from swirl_vl.eval.metrics import image_metrics, l1, psnr, ssim


def test_identical_images():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    m = image_metrics(x, x)
    assert m["fwm_l1"].eq(0).all()
    assert m["fwm_psnr"].eq(100).all()
    torch.testing.assert_close(m["fwm_ssim"], torch.ones(2))


def test_psnr_and_l1_closed_form():
    a = torch.zeros(1, 3, 8, 8)
    b = torch.full((1, 3, 8, 8), 0.1)
    assert l1(a, b).item() == pytest.approx(0.1)
    assert psnr(a, b).item() == pytest.approx(-10 * math.log10(0.01), rel=1e-5)  # 20 dB


def test_ssim_orders_degradations():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 32, 32, generator=g)
    slight = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    heavy = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    s_slight, s_heavy = ssim(x, slight).item(), ssim(x, heavy).item()
    assert s_heavy < s_slight < 1
    # Constant images of different brightness: SSIM reduces to the luminance term, a closed form.
    a, b = torch.full((1, 3, 16, 16), 0.2), torch.full((1, 3, 16, 16), 0.6)
    c1 = 0.01**2
    assert ssim(a, b).item() == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1), rel=1e-4)
