"""The bf16 NaN/Inf check on raw bits agrees with torch.isfinite on every bit pattern."""

import pytest
import torch

from eaglecache.formats.bits import all_finite


def test_all_finite_agrees_with_torch_on_every_bf16_bit_pattern():
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = torch.isfinite(every)
    assert 0 < int(finite.sum()) < len(every)  # both kinds are there
    for value, expected in zip(every.reshape(-1, 1), finite.tolist()):  # each pattern alone
        assert all_finite(value) == expected


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_nonfinite_value_in_a_strided_view_is_found(bad):
    states = (torch.randn(64, 4, 32) * 1e4).to(torch.bfloat16)
    assert all_finite(states) and all_finite(states[:, :3]) and all_finite(states[:, 3])
    states[37, 3, 5] = bad
    assert not all_finite(states) and not all_finite(states[:, 3])
    assert all_finite(states[:, :3])  # the view that does not hold it


def test_other_dtypes_use_torch():
    assert all_finite(torch.ones(8, dtype=torch.float32))
    assert not all_finite(torch.tensor([1.0, float("nan")], dtype=torch.float16))
    assert all_finite(torch.empty(0, 4, dtype=torch.bfloat16))
