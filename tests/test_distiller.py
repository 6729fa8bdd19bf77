import pytest
import torch
from torch.nn import functional as F

from esamp_pl.distiller import DistillerBank, DistillerSpec


def reference_forward(bank: DistillerBank, index: int, s: torch.Tensor) -> torch.Tensor:
    """The spec's formula, one Distiller at a time: f(s) = LN(s + ((s A) * silu(s G + b)) B)."""
    x = s
    for k in range(bank.spec.num_blocks):
        A, G, b, B = bank.up[index, k], bank.gate[index, k], bank.gate_bias[index, k, 0], bank.down[index, k]
        x = x + ((x @ A) * F.silu(x @ G + b)) @ B
    return F.layer_norm(x, (bank.spec.hidden_size,), bank.norm_weight[index, 0], bank.norm_bias[index, 0])


@pytest.mark.parametrize("blocks", [1, 2])
def test_bank_matches_the_formula_per_distiller(blocks):
    spec = DistillerSpec(hidden_size=16, rank=4, num_blocks=blocks)
    bank = DistillerBank(spec, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    s = torch.randn(3, 5, 16)
    out = bank(s)
    assert out.shape == (3, 5, 16)
    for i in range(3):
        torch.testing.assert_close(out[i], reference_forward(bank, i, s[i]))


def test_random_init_is_the_papers():
    bank = DistillerBank(DistillerSpec(hidden_size=256, rank=64), 2, generator=torch.Generator().manual_seed(0))
    assert abs(bank.up.std().item() - 0.02) < 0.002
    assert torch.all(bank.gate_bias == 1.0) and torch.all(bank.norm_weight == 1) and torch.all(bank.norm_bias == 0)
    same = DistillerBank(DistillerSpec(hidden_size=256, rank=64), 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(bank.up, same.up)


def test_single_state_round_trip_fills_every_slot():
    spec = DistillerSpec(hidden_size=8, rank=2)
    source = DistillerBank(spec, 1, generator=torch.Generator().manual_seed(3))
    bank = DistillerBank(spec, 4)
    bank.load_single(source.single_state())
    for name, p in bank.named_parameters():
        for i in range(4):
            assert torch.equal(p[i], getattr(source, name)[0])


def test_shape_errors_name_the_expected_shape():
    bank = DistillerBank(DistillerSpec(hidden_size=8, rank=2), 2)
    with pytest.raises(ValueError, match=r"\[2, rows, 8\]"):
        bank(torch.randn(3, 1, 8))
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        DistillerSpec(hidden_size=8, rank=0)
