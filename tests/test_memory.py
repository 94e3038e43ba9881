"""The memory plan's counting: exact bytes for tensors, the activation formula, the stage peaks."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from swirl_vl.training.memory import MemoryPlan, decoder_activation_bytes, parameter_bytes


def test_parameter_bytes_counts_each_tensor_once_at_its_dtype() -> None:
    a = nn.Linear(10, 4)  # 44 float32 values
    b = nn.Linear(3, 2).to(torch.bfloat16)  # 8 bfloat16 values
    shared = list(a.parameters())
    assert parameter_bytes([*shared, *shared, *b.parameters()]) == 44 * 4 + 8 * 2


def test_decoder_activations_follow_the_closed_form() -> None:
    config = SimpleNamespace(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, vocab_size=10
    )
    rows, tokens, scored = 3, 5, 4
    per_position = 2 * (8 * 8 + 3 * 16 + 2 * tokens) * 4
    expected = rows * tokens * per_position + rows * scored * 2 * 10 * 4
    assert decoder_activation_bytes(config, rows, tokens, scored) == expected
    # Twice the rows, twice the memory: the estimate is linear in the micro-batch, which bounds it.
    assert decoder_activation_bytes(config, 2 * rows, tokens, scored) == 2 * expected


def test_plan_peak_is_the_largest_stage() -> None:
    plan = MemoryPlan(items={"runtime": 100}, stages={"sft": 150, "phase1": 300, "phase2": 200})
    assert plan.peak == 300
    table = plan.table()
    assert "| **predicted peak, phase1** | **0.0** |" in table and "| runtime |" in table
