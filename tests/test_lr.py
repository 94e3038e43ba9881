"""The SFT learning-rate schedule: fixed values of the pure factor, and that SwirlModule applies it."""

from __future__ import annotations

import math

import pytest

from swirl_vl.training.lr import lr_factor


def test_warmup_is_linear() -> None:
    assert [lr_factor(s, 100, 4, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_ends_at_floor_and_passes_midpoint() -> None:
    # 10 warm-up steps, then 91 decay steps 10..100: progress (s - 10) / 90.
    assert lr_factor(10, 101, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 101, 10, "cosine") == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_factor(100, 101, 10, "cosine") == pytest.approx(0.05)
    assert lr_factor(40, 101, 10, "cosine", floor=0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))


def test_constant_after_warmup_and_past_the_end() -> None:
    assert lr_factor(50, 101, 10, "constant") == 1.0
    assert lr_factor(500, 101, 10, "cosine") == pytest.approx(0.05)  # a resumed, longer stage stays at the floor


def test_wsd_holds_the_rate_then_decays_over_its_last_fraction() -> None:
    # 101 steps, 10 warm-up, the last 20 (81..100) decay: progress (s - 81) / 19.
    assert lr_factor(9, 101, 10, "wsd") == pytest.approx(1.0)
    assert [lr_factor(s, 101, 10, "wsd") for s in (10, 50, 80, 81)] == [1.0, 1.0, 1.0, 1.0]
    assert lr_factor(90, 101, 10, "wsd", floor=0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 19)))
    assert lr_factor(100, 101, 10, "wsd") == pytest.approx(0.05)
    assert lr_factor(60, 101, 10, "wsd", decay_fraction=1.0) == lr_factor(60, 101, 10, "cosine")
    # A stage so short that its decay is one step (4 steps, 2 warm-up: round(0.2 × 4) = 1) still ends annealed.
    assert [lr_factor(s, 4, 2, "wsd") for s in range(4)] == pytest.approx([0.5, 1.0, 1.0, 0.05])
