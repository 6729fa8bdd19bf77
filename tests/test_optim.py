import torch

from esamp_pl.optim import AdamSpec, BankAdam


def test_matches_torch_adam_with_clipping_per_slot():
    torch.manual_seed(0)
    spec = AdamSpec(lr=1e-2, eps=1e-4, grad_clip=0.5)
    bank = [torch.randn(3, 4, 5), torch.randn(3, 5)]
    refs = [[t[i].clone().requires_grad_() for t in bank] for i in range(3)]
    ref_opts = [torch.optim.Adam(r, lr=1e-2, eps=1e-4) for r in refs]
    opt = BankAdam(bank, spec)
    for step in range(4):
        grads = [torch.randn_like(t) * (step + 1) for t in bank]
        mask = torch.tensor([True, step % 2 == 0, True])
        opt.step(grads, mask)
        for i in range(3):
            if not mask[i]:
                continue
            for r, g in zip(refs[i], grads):
                r.grad = g[i].clone()
            torch.nn.utils.clip_grad_norm_(refs[i], 0.5)
            ref_opts[i].step()
    for i in range(3):
        for t, r in zip(bank, refs[i]):
            torch.testing.assert_close(t[i], r.detach(), rtol=1e-5, atol=1e-6)


def test_masked_slot_is_left_untouched_even_with_nan_free_momentum():
    bank = [torch.ones(2, 3)]
    opt = BankAdam(bank, AdamSpec(lr=0.1))
    opt.step([torch.ones(2, 3)], torch.tensor([True, True]))
    frozen = bank[0][1].clone()
    moments = opt.exp_avg[0][1].clone()
    opt.step([torch.ones(2, 3)], torch.tensor([True, False]))
    assert torch.equal(bank[0][1], frozen) and torch.equal(opt.exp_avg[0][1], moments)
    assert not torch.equal(bank[0][0], frozen)


def test_fused_kernel_and_plain_tensor_ops_agree():
    torch.manual_seed(0)
    spec = AdamSpec(lr=1e-2, eps=1e-4, grad_clip=0.5, weight_decay=0.01)
    start = [torch.randn(3, 4, 5), torch.randn(3, 1, 5)]
    fused_bank, plain_bank = [t.clone() for t in start], [t.clone() for t in start]
    fused, plain = BankAdam(fused_bank, spec), BankAdam(plain_bank, spec)
    plain.fused = False
    assert fused.fused
    for step in range(5):
        grads = [torch.randn_like(t) * (step + 1) for t in start]
        mask = torch.tensor([True, step % 2 == 0, step > 0])
        assert torch.equal(fused.step(grads, mask), plain.step(grads, mask))
    for a, b in zip(fused_bank, plain_bank):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.steps, plain.steps)


def test_a_non_finite_gradient_skips_only_its_distiller():
    bank = [torch.ones(3, 4)]
    opt = BankAdam(bank, AdamSpec(lr=0.1))
    grad = torch.ones(3, 4)
    grad[1, 2] = float("inf")
    stepped = opt.step([grad], torch.ones(3, dtype=torch.bool))
    assert stepped.tolist() == [True, False, True] and opt.steps.tolist() == [1.0, 0.0, 1.0]
    assert torch.equal(bank[0][1], torch.ones(4)) and torch.isfinite(bank[0]).all()
    assert not torch.equal(bank[0][0], torch.ones(4))


def test_the_reference_preset_is_torch_adamw_without_clipping():
    """conf/esamp/reference.yaml is the reference code's optimizer: torch.optim.AdamW's defaults at lr 1e-3."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from esamp_pl.settings import esamp_settings

    conf = Path(__file__).resolve().parents[1] / "conf"
    settings = esamp_settings(OmegaConf.load(conf / "esamp" / "reference.yaml"),
                              OmegaConf.load(conf / "distiller" / "default.yaml"), hidden_size=16)
    spec = settings.adapter.optimizer
    reference = torch.optim.AdamW([torch.zeros(1)], lr=1e-3).defaults
    assert (spec.lr, spec.eps, spec.weight_decay, spec.betas) == (reference["lr"], reference["eps"],
                                                                  reference["weight_decay"], reference["betas"])
    assert spec.grad_clip is None and settings.adapter.rows_trained == "first"
    torch.manual_seed(0)
    start = [torch.randn(2, 4, 5), torch.randn(2, 5)]
    for fused in (True, False):
        bank = [t.clone() for t in start]
        refs = [[t[i].clone().requires_grad_() for t in start] for i in range(2)]
        ref_opts = [torch.optim.AdamW(r, lr=1e-3) for r in refs]
        opt = BankAdam(bank, spec)
        opt.fused = opt.fused and fused
        for step in range(4):
            grads = [torch.randn_like(t) * 100 for t in start]  # far above any clip threshold
            opt.step(grads, torch.ones(2, dtype=torch.bool))
            for i in range(2):
                for r, g in zip(refs[i], grads):
                    r.grad = g[i].clone()
                ref_opts[i].step()
        for i in range(2):
            for t, r in zip(bank, refs[i]):
                torch.testing.assert_close(t[i], r.detach(), rtol=1e-5, atol=1e-6)
