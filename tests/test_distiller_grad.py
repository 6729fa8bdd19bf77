import pytest
import torch

from esamp_pl.distiller import DistillerBank, DistillerSpec
from esamp_pl.distiller_grad import DistillerGrad


@pytest.mark.parametrize("num_blocks,output_norm", [(1, True), (2, True), (1, False), (3, False)])
def test_hand_written_backward_matches_autograd(num_blocks, output_norm):
    spec = DistillerSpec(hidden_size=12, rank=5, num_blocks=num_blocks, output_norm=output_norm, init_std=0.3)
    bank = DistillerBank(spec, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():  # non-trivial norm affine, so its gradient paths are exercised
        for p in bank.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    source = torch.randn(3, 4, 12, dtype=torch.float64)
    upstream = torch.randn(3, 4, 12, dtype=torch.float64)

    hand = DistillerGrad(bank)
    prediction, saved = hand.forward(source, keep=True)
    assert torch.equal(prediction, bank(source).detach())  # the module's exact ops, bit for bit
    grads = hand.backward(saved, upstream)

    reference = torch.autograd.grad((bank(source) * upstream).sum(), list(bank.parameters()))
    assert [g.shape for g in grads] == [p.shape for p in bank.parameters()]
    for (name, _), got, want in zip(bank.named_parameters(), grads, reference):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


def test_forward_without_keep_saves_nothing_and_buffers_are_reused():
    bank = DistillerBank(DistillerSpec(hidden_size=8, rank=4), 2)
    grad = DistillerGrad(bank)
    _, saved = grad.forward(torch.randn(2, 3, 8), keep=False)
    assert saved is None
    first = grad.backward(grad.forward(torch.randn(2, 3, 8), keep=True)[1], torch.randn(2, 3, 8))
    second = grad.backward(grad.forward(torch.randn(2, 3, 8), keep=True)[1], torch.randn(2, 3, 8))
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(first, second))
