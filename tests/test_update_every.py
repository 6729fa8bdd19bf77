import pytest
import torch
from omegaconf import OmegaConf

from esamp_pl.adapter import AdapterSpec, TestTimeAdapter
from esamp_pl.async_update import make_updater
from esamp_pl.distiller import DistillerSpec
from esamp_pl.optim import AdamSpec
from esamp_pl.engine import DecodeEngine, DecodeSettings, ESampSettings
from esamp_pl.sampling import SamplingParams
from esamp_pl.settings import esamp_settings
from esamp_pl.sites import SitePair
from esamp_pl.static_engine import StaticDecodeEngine

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [20]]
EXACT = SamplingParams(max_candidates=256)


def adapter(prompts, n, every, lr=1e-2, scope="per_prompt", rows_trained="all"):
    spec = AdapterSpec(DistillerSpec(hidden_size=16, rank=8), optimizer=AdamSpec(lr=lr), update_every=every,
                       scope=scope, rows_trained=rows_trained)
    return TestTimeAdapter(spec, prompts, n, generator=torch.Generator().manual_seed(0))


def params(a):
    return {k: v.detach().clone() for k, v in a.bank.named_parameters()}


@pytest.mark.parametrize("scope", ["per_prompt", "shared"])
def test_a_block_update_is_one_step_on_all_pairs_of_its_k_steps(scope):
    k, prompts, n = 3, 2, 2
    ring_adapter, reference = adapter(prompts, n, k, scope=scope), adapter(prompts, n * k, 1, scope=scope)
    torch.manual_seed(1)
    sources, targets = torch.randn(k, prompts * n, 16), torch.randn(k, prompts * n, 16)
    active = torch.ones(k, prompts * n, dtype=torch.bool)
    active[2, 1] = False  # a row that finished before the last step of the block
    updater = make_updater(ring_adapter, "sync", device=torch.device("cpu"))
    start = params(ring_adapter)
    for step in range(k):
        updater.stage(sources[step], targets[step], active[step])
        updater.launch()
        if step < k - 1:
            assert all(torch.equal(p, start[name]) for name, p in ring_adapter.bank.named_parameters())

    def per_prompt(x):  # [k, prompts * n, ...] -> prompt-major rows of k * n samples each
        return x.view(k, prompts, n, *x.shape[2:]).transpose(0, 1).reshape(prompts * n * k, *x.shape[2:])

    reference.update_on(per_prompt(sources), per_prompt(targets), per_prompt(active))
    for name, p in reference.bank.named_parameters():
        torch.testing.assert_close(ring_adapter.bank.state_dict()[name], p.detach(), rtol=1e-5, atol=1e-6)
    ours, theirs = ring_adapter.stats(), reference.stats()
    assert ours.updates == theirs.updates == (prompts if scope == "per_prompt" else 1)
    torch.testing.assert_close(ours.loss_per_step, theirs.loss_per_step, rtol=1e-6, atol=0)
    if scope == "shared":
        return
    # The loss is the mean over the block's trained pairs of ||h - f(s)||^2 under the parameters before it.
    with torch.no_grad():
        predicted = adapter(prompts, n, 1).bank(sources.view(k, prompts, n, 16).transpose(0, 1).reshape(prompts, -1, 16))
    squared = (predicted.view(prompts, k, n, 16) - targets.view(k, prompts, n, 16).transpose(0, 1)).pow(2).sum(-1)
    keep = active.view(k, prompts, n).transpose(0, 1)
    assert ours.loss_per_step[0] == pytest.approx(float(squared[keep].mean()), rel=1e-5)


def test_rows_trained_first_holds_in_every_step_of_a_block():
    k, prompts, n = 2, 2, 3
    ring_adapter = adapter(prompts, n, k, rows_trained="first")
    reference = adapter(prompts, k, 1)  # only sample 0 of each prompt, at both steps
    torch.manual_seed(2)
    sources, targets = torch.randn(k, prompts * n, 16), torch.randn(k, prompts * n, 16)
    updater = make_updater(ring_adapter, "sync", device=torch.device("cpu"))
    for step in range(k):
        updater.stage(sources[step], targets[step], torch.ones(prompts * n, dtype=torch.bool))
        updater.launch()
    first = [0, n]  # sample 0 of each prompt

    def per_prompt(x):
        return x[:, first].transpose(0, 1).reshape(prompts * k, *x.shape[2:])

    reference.update_on(per_prompt(sources), per_prompt(targets), torch.ones(prompts * k, dtype=torch.bool))
    for name, p in reference.bank.named_parameters():
        torch.testing.assert_close(ring_adapter.bank.state_dict()[name], p.detach(), rtol=1e-5, atol=1e-6)


def esamp(every, update_mode="sync"):
    return ESampSettings(AdapterSpec(DistillerSpec(hidden_size=64, rank=8), update_mode=update_mode,
                                     update_every=every), beta=0.5)


def tokens(result):
    return [s.token_ids for p in result.prompts for s in p.samples]


@pytest.mark.parametrize("kind", ["eager", "static"])
def test_every_k_steps_counts_its_updates_and_both_engines_agree(tiny_llama, kind):
    common = dict(sites=SitePair(), stop_token_ids=[2], pad_token_id=0)
    engine = (DecodeEngine if kind == "eager" else StaticDecodeEngine)(tiny_llama, **common)
    settings = DecodeSettings(n=2, max_new_tokens=20, seed=3, sampling=EXACT, esamp=esamp(3), ignore_eos=True)
    result = engine.generate(PROMPTS, settings)
    assert result.steps == 19
    assert result.adapter_stats.updates == len(PROMPTS) * (19 // 3)  # a last partial block is not trained on
    assert len(result.adapter_stats.loss_per_step) == 19 // 3
    reference = DecodeEngine(tiny_llama, **common).generate(PROMPTS, settings)
    assert tokens(result) == tokens(reference)
    every_step = DecodeEngine(tiny_llama, **common).generate(
        PROMPTS, DecodeSettings(n=2, max_new_tokens=20, seed=3, sampling=EXACT, esamp=esamp(1), ignore_eos=True))
    assert tokens(every_step) != tokens(result)  # k changes which parameters the predictions use


def test_async_update_gives_the_sync_tokens_with_k_greater_than_one(tiny_llama):
    engine = DecodeEngine(tiny_llama, sites=SitePair(), stop_token_ids=[30, 31, 32], pad_token_id=0)
    runs = [engine.generate(PROMPTS, DecodeSettings(n=3, max_new_tokens=16, seed=1, sampling=EXACT,
                                                    esamp=esamp(4, mode))) for mode in ("sync", "async")]
    assert tokens(runs[0]) == tokens(runs[1])
    assert runs[0].adapter_stats.loss_per_step == runs[1].adapter_stats.loss_per_step
    assert runs[0].adapter_stats.updates == runs[1].adapter_stats.updates > 0


@pytest.mark.parametrize("kind", ["eager", "static"])
def test_k_equal_one_is_the_per_step_update_bit_for_bit(tiny_llama, kind):
    common = dict(sites=SitePair(), stop_token_ids=[30, 31, 32], pad_token_id=0)
    engine = (DecodeEngine if kind == "eager" else StaticDecodeEngine)(tiny_llama, **common)
    default = ESampSettings(AdapterSpec(DistillerSpec(hidden_size=64, rank=8), update_mode="sync"), beta=0.5)
    run = dict(n=3, max_new_tokens=16, seed=1, sampling=EXACT, ignore_eos=True)
    a = engine.generate(PROMPTS, DecodeSettings(**run, esamp=default))
    b = engine.generate(PROMPTS, DecodeSettings(**run, esamp=esamp(1)))
    assert tokens(a) == tokens(b)
    assert a.adapter_stats.loss_per_step == b.adapter_stats.loss_per_step
    assert a.adapter_stats.updates == b.adapter_stats.updates == len(PROMPTS) * a.steps
    assert default.adapter.update_every == 1


def test_update_every_is_a_validated_config_key():
    distiller = OmegaConf.create({"rank": 8})
    assert esamp_settings(OmegaConf.create({"update_every": 4}), distiller, 64).adapter.update_every == 4
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=f"esamp.update_every must be an integer >= 1.*but is {bad!r}"):
            AdapterSpec(DistillerSpec(hidden_size=8), update_every=bad)


def _relative_every(every, update_mode):
    adapter = AdapterSpec(DistillerSpec(hidden_size=64, rank=8), update_mode=update_mode, update_every=every)
    return ESampSettings(adapter, beta=0.5, error="relative")


@pytest.mark.parametrize("update_mode", ["sync", "async"])
def test_neither_option_reads_a_device_value_on_the_host_inside_a_step(tiny_llama, forbid_host_reads_in_static_step,
                                                                      update_mode):
    static = StaticDecodeEngine(tiny_llama, sites=SitePair(), stop_token_ids=[2], pad_token_id=0)
    static.fixed_candidates = True
    result = static.generate(PROMPTS, DecodeSettings(n=2, max_new_tokens=10, esamp=_relative_every(3, update_mode),
                                                     ignore_eos=True))
    assert result.steps == 9 and result.adapter_stats.updates == len(PROMPTS) * 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("update_mode", ["sync", "async"])
@pytest.mark.parametrize("every", [1, 3])
def test_cuda_graph_replay_equals_eager_with_both_options(update_mode, every):
    from tests.conftest import tiny_model

    model = tiny_model("llama").cuda()
    common = dict(sites=SitePair(), stop_token_ids=list(range(30, 40)), pad_token_id=0)
    graphed = StaticDecodeEngine(model, **common, cuda_graphs=True)
    settings = DecodeSettings(n=3, max_new_tokens=16, seed=2, sampling=EXACT, esamp=_relative_every(every, update_mode))
    replayed = graphed.generate(PROMPTS, settings)
    assert replayed.mode.startswith("static, cuda graphs") and graphed.graph_failure is None, replayed.mode
    for reference in (StaticDecodeEngine(model, **common, cuda_graphs=False).generate(PROMPTS, settings),
                      DecodeEngine(model, **common).generate(PROMPTS, settings)):
        assert tokens(replayed) == tokens(reference)
        assert replayed.adapter_stats.updates == reference.adapter_stats.updates > 0
        torch.testing.assert_close(replayed.adapter_stats.loss_per_step, reference.adapter_stats.loss_per_step)
    assert tokens(graphed.generate(PROMPTS, settings)) == tokens(replayed)  # replayed graphs, restarted state
