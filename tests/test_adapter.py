import math

import pytest
import torch

from esamp_pl.adapter import AdapterSpec, TestTimeAdapter
from esamp_pl.distiller import DistillerSpec
from esamp_pl.optim import AdamSpec


def make(scope="per_prompt", prompts=2, n=3, rows_trained="all", lr=4e-4):
    spec = AdapterSpec(DistillerSpec(hidden_size=16, rank=8), optimizer=AdamSpec(lr=lr), scope=scope,
                       rows_trained=rows_trained)
    return TestTimeAdapter(spec, prompts, n, generator=torch.Generator().manual_seed(0))


def step(adapter, source, target, active):
    adapter.predict(source)
    adapter.update(target, active)


def test_one_prompts_updates_leave_another_prompts_distiller_unchanged():
    adapter = make()
    before = {k: v.detach().clone() for k, v in adapter.bank.named_parameters()}
    active = torch.tensor([True, True, True, False, False, False])  # prompt 1 has finished
    for _ in range(3):
        step(adapter, torch.randn(6, 16), torch.randn(6, 16), active)
    for name, p in adapter.bank.named_parameters():
        assert torch.equal(p[1], before[name][1]), name
        assert not torch.equal(p[0], before[name][0]), name
    assert adapter.stats().updates == 3


def test_loss_falls_on_a_repeated_stream_of_pairs():
    adapter = make(prompts=1, n=4, lr=1e-2)
    torch.manual_seed(0)
    mix = torch.randn(16, 16) / 4
    source = torch.randn(4, 16)
    target = torch.tanh(source @ mix) * 3
    for _ in range(200):
        step(adapter, source, target, torch.ones(4, dtype=torch.bool))
    losses = adapter.stats().loss_per_step
    assert losses[-1] < 0.2 * losses[0]


def test_update_uses_this_steps_pairs_and_first_affects_the_next_prediction():
    adapter = make(prompts=1, n=2)
    s, h = torch.randn(2, 16), torch.randn(2, 16)
    first = adapter.predict(s)
    again = adapter.bank(s.view(1, 2, 16)).view(2, 16).detach()
    assert torch.equal(first, again)  # prediction at t uses parameters before the update of t
    adapter.update(h, torch.ones(2, dtype=torch.bool))
    after = adapter.predict(s)
    assert not torch.equal(first, after)


def test_first_row_only_trains_on_sample_zero():
    a = make(prompts=1, n=3, rows_trained="first")
    b = make(prompts=1, n=1)
    s, h = torch.randn(3, 16), torch.randn(3, 16)
    step(a, s, h, torch.ones(3, dtype=torch.bool))
    step(b, s[:1], h[:1], torch.ones(1, dtype=torch.bool))
    for pa, pb in zip(a.bank.parameters(), b.bank.parameters()):
        torch.testing.assert_close(pa, pb)


def test_a_non_finite_row_is_dropped_and_its_distiller_learns_from_the_others():
    adapter, reference = make(), make()
    source = torch.randn(6, 16)
    source[4, 0] = float("nan")  # a row of prompt 1
    target = torch.randn(6, 16)
    target[0, 3] = float("inf")  # a row of prompt 0
    prediction = adapter.predict(source)
    assert torch.isnan(prediction[4]).all() and torch.isfinite(prediction[[0, 1, 2, 3, 5]]).all()
    adapter.update(target, torch.ones(6, dtype=torch.bool))
    stats = adapter.stats()
    assert stats.skipped_nonfinite == 0 and stats.updates == 2
    finite = torch.tensor([False, True, True, True, False, True])
    clean_source = source.masked_fill(~finite.unsqueeze(-1), 0.0)
    step(reference, clean_source, target.masked_fill(~finite.unsqueeze(-1), 0.0), finite)
    for p, q in zip(adapter.bank.parameters(), reference.bank.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    torch.testing.assert_close(stats.loss_per_step, reference.stats().loss_per_step)
    assert all(torch.isfinite(m).all() for m in adapter.optimizer.exp_avg)


@pytest.mark.parametrize("max_steps", [None, 4])
def test_a_step_with_no_finite_trained_row_logs_nan_never_zero(max_steps):
    spec = AdapterSpec(DistillerSpec(hidden_size=16, rank=8))
    adapter = TestTimeAdapter(spec, 2, 2, generator=torch.Generator().manual_seed(0), max_steps=max_steps)
    before = [p.detach().clone() for p in adapter.bank.parameters()]
    target = torch.full((4, 16), float("nan"))
    step(adapter, torch.randn(4, 16), target, torch.ones(4, dtype=torch.bool))  # every row broken
    step(adapter, torch.randn(4, 16), torch.randn(4, 16), torch.zeros(4, dtype=torch.bool))  # every row finished
    stats = adapter.stats()
    assert stats.skipped_nonfinite == 2 and stats.updates == 0
    assert len(stats.loss_per_step) == 1  # the step with no row to train is not a point of the curve
    assert math.isnan(stats.loss_per_step[0]) and math.isnan(stats.relative_error_per_step[0])
    for p, q in zip(adapter.bank.parameters(), before):
        assert torch.equal(p, q)


def test_first_trains_the_first_unfinished_row_of_each_prompt():
    first, reference = make(rows_trained="first"), make()
    source, target = torch.randn(6, 16), torch.randn(6, 16)
    active = torch.tensor([False, True, True, True, False, True])  # prompt 0's sample 0 has finished
    step(first, source, target, active)
    step(reference, source, target, torch.tensor([False, True, False, True, False, False]))
    assert first.stats().updates == 2
    for p, q in zip(first.bank.parameters(), reference.bank.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_shared_scope_has_one_distiller_for_all_rows():
    adapter = make(scope="shared")
    assert adapter.bank.num_distillers == 1
    step(adapter, torch.randn(6, 16), torch.randn(6, 16), torch.ones(6, dtype=torch.bool))
    assert adapter.stats().updates == 1


def test_bad_scope_is_rejected():
    with pytest.raises(ValueError, match="esamp.scope must be one of"):
        AdapterSpec(DistillerSpec(hidden_size=4), scope="global")


def test_the_online_curves_are_the_shared_loss_and_relative_error():
    """The adapter's curves use the definitions that pre-training uses too (one loss, one relative error)."""
    from esamp_pl import distiller
    from esamp_pl.pretrain import module

    assert module.distiller_loss is distiller.distiller_loss
    adapter = make(prompts=1, n=4)
    source, target = torch.randn(4, 16), torch.randn(4, 16) * 3
    prediction = adapter.predict(source)
    adapter.update(target, torch.ones(4, dtype=torch.bool))
    stats = adapter.stats()
    torch.testing.assert_close(stats.loss_per_step[0], distiller.distiller_loss(prediction, target).item())
    want = distiller.relative_error(distiller.squared_error(prediction, target).sum(), target.pow(2).sum())
    torch.testing.assert_close(stats.relative_error_per_step[0], want.item())
    assert distiller.relative_error(2.0, 0.0) == 2.0 / distiller.RELATIVE_ERROR_FLOOR
