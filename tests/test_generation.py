"""Helpers shared by the token backends: distinct rows within rollout groups, and row-wise work run once per row."""

from __future__ import annotations

import torch

from swirl_vl.models.generation import distinct_rows_in_groups, per_distinct_row


def test_distinct_rows_are_found_within_groups_only() -> None:
    rows = torch.tensor([[1, 2], [1, 2], [3, 4], [1, 2], [5, 6], [5, 6]])  # groups of 3: rows 0-2 and 3-5
    kept, inverse = distinct_rows_in_groups([rows], group_size=3)
    assert kept.tolist() == [0, 2, 3, 4]  # row 3 equals row 0 but lies in the other group
    assert inverse.tolist() == [0, 0, 1, 2, 3, 3]
    assert torch.equal(rows[kept][inverse], rows)


def test_distinct_rows_compare_every_column() -> None:
    ids = torch.tensor([[7, 8], [7, 8], [7, 8]])
    mask = torch.tensor([[1, 1], [0, 1], [1, 1]])
    kept, inverse = distinct_rows_in_groups([ids, mask], group_size=3)
    assert kept.tolist() == [0, 1] and inverse.tolist() == [0, 1, 0]


def test_per_distinct_row_runs_each_row_once_with_the_same_output() -> None:
    seen = []

    def decode(codes: torch.Tensor) -> torch.Tensor:
        seen.append(codes.shape[0])
        return codes.float().cumsum(1) * 0.5

    codes = torch.tensor([[1, 2, 3], [1, 2, 3], [0, 0, 1], [1, 2, 3]] * 4)  # 16 rows, 2 distinct
    out = per_distinct_row(decode, codes, multiple=4)
    torch.testing.assert_close(out, codes.float().cumsum(1) * 0.5)
    assert seen == [4]  # the 2 distinct rows, padded to a multiple of 4
    per_distinct_row(decode, codes[:4], multiple=4)  # padding would reach the batch: it runs as it came
    assert seen == [4, 4]
