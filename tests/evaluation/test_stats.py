"""Report statistics: aggregation, the fair comparison and paired errors, on hand-made records (no model)."""

import math

import pytest

import numpy as np

from esamp_pl.evaluation.stats import compare_to_curve, paired_difference_se, paired_pass_at_k, summarize

CURVE = [(10.0, 3.0), (20.0, 5.0), (40.0, 6.0)]  # (perplexity, Vendi) of a baseline's temperature sweep


@pytest.mark.parametrize("point, position, delta", [
    ((20.0, 5.5), "above", 0.5),        # on a curve point
    ((math.sqrt(200), 3.5), "below", -0.5),  # halfway between 10 and 20 in log perplexity: curve at 4.0
    ((5.0, 3.2), "above", 0.2),         # lower perplexity and more diverse than the curve's end: dominates
    ((80.0, 5.0), "below", -1.0),       # higher perplexity and less diverse: dominated
    ((5.0, 2.0), "outside", -1.0),      # lower perplexity but less diverse: the curve says nothing
    ((20.0, math.nan), "n/a", None),
])
def test_compare_to_curve(point, position, delta):
    got, diff = compare_to_curve(point, CURVE)
    assert got == position
    assert (diff is None and delta is None) or diff == pytest.approx(delta)


def _record(method, pid, correct, vendi, ppls):
    return {"kind": "problem", "method": method, "problem_id": pid, "num_correct": correct,
            "diversity": {"vendi": vendi, "mean_cosine": 0.5, "distinct_2": 0.9},
            "samples": [{"num_tokens": 10, "perplexity": p} for p in ppls]}


def test_summarize_uses_the_problems_every_method_finished():
    info = {"n": 2, "problems": ["p0", "p1"], "methods": [
        {"name": "min_p0.1", "family": "min_p0.1", "sampling": {"temperature": 1.0}, "esamp": {"enabled": False}},
        {"name": "esamp_random", "family": "esamp_random", "sampling": {"temperature": 1.0},
         "esamp": {"enabled": True, "beta": 0.25, "init": "random"}}]}
    records = [_record("min_p0.1", "p0", 1, 2.0, [2.0, 8.0]), _record("min_p0.1", "p1", 0, 1.0, [4.0, 4.0]),
               _record("esamp_random", "p0", 2, 1.5, [4.0, 4.0])]  # p1 not finished yet
    batches = [{"method": "esamp_random", "decode_seconds": 2.0, "tokens_generated": 20, "distiller_updates": 3,
                "relative_error_per_step": [0.9, 0.5, 0.4]}]
    summaries, common = summarize(info, records, batches)
    assert common == ["p0"]
    base, esamp = summaries
    assert base.problems == esamp.problems == 1
    assert base.pass_at_k == {1: 0.5, 2: 1.0} and esamp.pass_at_k == {1: 1.0, 2: 1.0}
    assert base.perplexity == pytest.approx(4.0)  # geometric mean of 2 and 8
    assert base.beta is None and esamp.beta == 0.25 and esamp.init == "random"
    assert esamp.relative_error_first == 0.9 and esamp.relative_error_last == 0.4
    assert esamp.tokens_per_second == 10.0 and esamp.distiller_updates == 3


def test_paired_difference_se_cancels_shared_problem_difficulty():
    # Problem difficulty differs a lot, but the method beats the curve by exactly 0.5 on every problem.
    curve = [(10.0, [1.0, 5.0, 3.0]), (40.0, [2.0, 6.0, 4.0])]
    assert paired_difference_se([2.0, 6.0, 4.0], curve, 20.0) == pytest.approx(0.0, abs=1e-12)  # curve at +0.5
    assert paired_difference_se([2.0, 6.5, 4.0], curve, 40.0) > 0
    assert math.isnan(paired_difference_se([2.0], curve, 20.0))
    tied = [(10.0, [1.0, 5.0, 3.0]), (10.0, [2.0, 6.0, 4.0])]  # two baseline points at the same perplexity
    assert math.isfinite(paired_difference_se([2.0, 6.5, 4.0], tied, 10.0))


def test_paired_pass_at_k_against_hand_computed_values():
    # n = 4. pass@1 = c / 4; pass@2 = 1 - C(4-c, 2) / C(4, 2): c=0 -> 0, c=1 -> 0.5, c=2 -> 5/6, c>=3 -> 1.
    method, reference = [2, 4, 1], [1, 4, 0]
    mean1, se1 = paired_pass_at_k(method, reference, 4, 1)
    assert mean1 == pytest.approx(1 / 6) and se1 == pytest.approx(float(np.std([0.25, 0, 0.25], ddof=1) / math.sqrt(3)))
    diffs2 = [5 / 6 - 0.5, 0.0, 0.5 - 0.0]
    mean2, se2 = paired_pass_at_k(method, reference, 4, 2)
    assert mean2 == pytest.approx(sum(diffs2) / 3)
    assert se2 == pytest.approx(float(np.std(diffs2, ddof=1) / math.sqrt(3)))
    with pytest.raises(ValueError, match="pair the same problems"):
        paired_pass_at_k([1], [1, 2], 4, 1)


def _summary(name, esamp, vendis, ppls, family=None):
    """A MethodSummary as summarize makes it, per unit: Vendi and (one sample's) perplexity."""
    from esamp_pl.evaluation.stats import MethodSummary

    esamp_on = esamp.get("enabled", True)
    return MethodSummary(name=name, family=family or name, temperature=1.0, beta=esamp.get("beta") if esamp_on else None,
                         init=(esamp.get("init", "random") if esamp_on and esamp.get("mode", "esamp") == "esamp"
                               else None), problems=len(vendis), vendi_per_problem=list(vendis),
                         vendi=float(np.mean(vendis)), log_perplexity_per_problem=[math.log(p) for p in ppls],
                         perplexity=float(np.exp(np.mean(np.log(ppls)))), sampling={"temperature": 1.0, "min_p": 0.1},
                         esamp=esamp)


ESAMP = {"enabled": True, "mode": "esamp", "beta": 0.25, "init": "random", "learn": True, "update_mode": "async"}


def test_twins_are_found_by_settings_with_paired_errors_by_hand():
    from esamp_pl.evaluation.stats import twin_comparison

    learner = _summary("a", ESAMP, [3.0, 5.0, 4.0], [10.0, 20.0, 40.0])
    summaries = [
        _summary("min_p", {"enabled": False}, [2.0, 4.0, 3.0], [10.0, 10.0, 10.0]),
        _summary("min_p@T1.3", {"enabled": False}, [3.0, 6.0, 5.0], [40.0, 40.0, 40.0], family="min_p"),
        learner,
        # same settings but learn=false (and another update_mode, which does not change the samples): the twin
        _summary("z", {**ESAMP, "learn": False, "update_mode": "sync"}, [2.5, 5.0, 3.0], [10.0, 20.0, 20.0]),
        # learn=false at another beta: not a twin, although named like one
        _summary("a_frozen", {**ESAMP, "learn": False, "beta": 0.5}, [1.0, 1.0, 1.0], [10.0, 10.0, 10.0]),
        _summary("warm", {**ESAMP, "init": "warm"}, [4.0, 5.0, 6.0], [10.0, 20.0, 40.0]),
    ]
    frozen, random = twin_comparison(summaries, "min_p")
    rows = {r.name: r for r in frozen}
    assert set(rows) == {"a", "warm"}  # the methods that learn
    assert rows["a"].twin == "z"
    assert rows["warm"].twin is None and rows["warm"].vendi is None  # listed, without a twin
    diffs = [0.5, 0.0, 1.0]
    row = rows["a"]
    assert row.vendi.mean == pytest.approx(0.5)
    assert row.vendi.se == pytest.approx(float(np.std(diffs, ddof=1)) / math.sqrt(3))
    assert (row.vendi.wins, row.vendi.losses) == (2, 0)
    assert row.log_perplexity.mean == pytest.approx(math.log(2) / 3)  # only unit 3 differs: 40 vs 20
    # Residual: Vendi minus the curve at the method's own perplexity. The curve goes (10 -> per-unit 2, 4, 3) to
    # (40 -> 3, 6, 5); a is at ppl 20 (halfway in log): curve 2.5, 5, 4; z at ppl 20**(2/3) * 10**(1/3): weight 1/3.
    w = (math.log(float(np.exp(np.mean(np.log([10.0, 20.0, 20.0]))))) - math.log(10)) / math.log(4)
    curve_z = [2 + w, 4 + 2 * w, 3 + 2 * w]
    res = [(3 - 2.5) - (2.5 - curve_z[0]), (5 - 5) - (5 - curve_z[1]), (4 - 4) - (3 - curve_z[2])]
    assert row.residual.mean == pytest.approx(np.mean(res))
    assert row.residual.se == pytest.approx(float(np.std(res, ddof=1)) / math.sqrt(3))
    (vs_random,) = random
    assert vs_random.name == "warm" and vs_random.twin == "a"  # same settings, random init
    assert vs_random.vendi.mean == pytest.approx(1.0) and (vs_random.vendi.wins, vs_random.vendi.losses) == (2, 0)  # 1, 0, 2


def test_twins_match_the_distiller_width_and_ignore_a_frozen_cadence():
    """A rank-384 learner's twins are rank 384; a frozen Distiller has no update cadence to match."""
    from dataclasses import replace

    from esamp_pl.evaluation.stats import frozen_twin, random_twin

    vendis, ppls = [3.0, 4.0], [10.0, 20.0]
    r64, r384 = {"rank": 64, "num_blocks": 1}, {"rank": 384, "num_blocks": 1}
    made = lambda name, esamp, width: replace(_summary(name, esamp, vendis, ppls), distiller=width)
    frozen64 = made("frozen64", {**ESAMP, "learn": False}, r64)
    frozen384 = made("frozen384", {**ESAMP, "learn": False}, r384)
    random64 = made("random64", ESAMP, r64)
    random384 = made("random384", ESAMP, r384)
    warm384 = made("warm384", {**ESAMP, "init": "warm"}, r384)
    every4 = made("every4", {**ESAMP, "update_every": 4}, r64)
    frozen64_every1 = made("frozen64_every1", {**ESAMP, "learn": False, "update_every": 1}, r64)
    summaries = [frozen64, frozen384, random64, random384, warm384, every4, frozen64_every1]
    assert frozen_twin(random384, summaries) is frozen384 and frozen_twin(random64, summaries) is frozen64
    assert random_twin(warm384, summaries) is random384
    assert frozen_twin(every4, summaries) in (frozen64, frozen64_every1)
    assert frozen_twin(warm384, summaries) is None  # no frozen warm start run
    # a learner whose cadence differs is not another learner's random twin
    assert random_twin(made("warm_every4", {**ESAMP, "init": "warm", "update_every": 4}, r64), summaries) is every4
