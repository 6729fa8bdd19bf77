import threading

import pytest
import torch

from esamp_pl.adapter import AdapterSpec, TestTimeAdapter
from esamp_pl.async_update import InlineUpdater, ThreadUpdater, make_updater
from esamp_pl.distiller import DistillerSpec
from esamp_pl.engine import DecodeEngine, DecodeSettings, ESampSettings
from esamp_pl.sampling import SamplingParams
from esamp_pl.sites import SitePair
from esamp_pl.static_engine import StaticDecodeEngine

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
ENGINES = [DecodeEngine, StaticDecodeEngine]


def adapter(prompts=2, n=3):
    spec = AdapterSpec(DistillerSpec(hidden_size=16, rank=4))
    return TestTimeAdapter(spec, prompts, n, generator=torch.Generator().manual_seed(0), max_steps=50)


def esamp(update_mode):
    return ESampSettings(AdapterSpec(DistillerSpec(hidden_size=64, rank=8), update_mode=update_mode), beta=0.25)


def run_steps(updater, pairs):
    """The decode loop's protocol; returns the optimizer steps each prediction saw."""
    seen = []
    for source, target in pairs:
        updater.wait()
        seen.append(updater.adapter.optimizer.steps.clone())
        updater.adapter.predict(source, for_update=updater.reuses_prediction)
        updater.stage(source, target, torch.ones(6, dtype=torch.bool))
        updater.launch()
    updater.close()
    return seen


def test_thread_updater_has_the_documented_lag_and_the_sync_result():
    torch.manual_seed(0)
    pairs = [(torch.randn(6, 16), torch.randn(6, 16)) for _ in range(6)]
    sync, threaded = InlineUpdater(adapter()), ThreadUpdater(adapter())
    seen_sync, seen_async = run_steps(sync, pairs), run_steps(threaded, pairs)
    assert len(seen_sync) == len(seen_async) == 6
    for step, (a, b) in enumerate(zip(seen_sync, seen_async)):
        assert torch.equal(a, b) and a.tolist() == [step] * 2  # lag 0: every earlier update is applied
    for p, q in zip(sync.adapter.bank.parameters(), threaded.adapter.bank.parameters()):
        assert torch.equal(p, q)
    assert sync.adapter.stats() == threaded.adapter.stats()


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_async_engine_gives_the_sync_tokens_and_predicts_after_every_earlier_update(tiny_llama, engine_cls,
                                                                                     monkeypatch):
    seen, threads = [], []
    predict = TestTimeAdapter.predict

    def spy(self, source, **kwargs):
        seen.append(int(self.optimizer.steps[0]))
        threads.append(threading.current_thread().name)
        return predict(self, source, **kwargs)

    monkeypatch.setattr(TestTimeAdapter, "predict", spy)
    engine = engine_cls(tiny_llama, sites=SitePair(), stop_token_ids=[255], pad_token_id=0)
    results = {}
    for mode in ("sync", "async"):
        seen.clear()
        threads.clear()
        settings = DecodeSettings(n=3, max_new_tokens=12, seed=1, esamp=esamp(mode),
                                  sampling=SamplingParams(max_candidates=256))
        results[mode] = engine.generate(PROMPTS, settings)
        assert seen == list(range(11)), mode  # lag 0: decode step k predicts after the k updates before it
        # async: the prediction runs on the update's worker, started by the source site's hook inside the forward
        worker = [name.startswith("esamp-update") for name in threads]
        assert worker == [mode == "async"] * 11, (mode, threads)
    sync, threaded = results["sync"], results["async"]
    assert [s.token_ids for p in sync.prompts for s in p.samples] == \
           [s.token_ids for p in threaded.prompts for s in p.samples]
    assert sync.adapter_stats == threaded.adapter_stats and threaded.adapter_stats.updates == 2 * 11
    assert "async update" in threaded.mode


def test_a_failing_update_surfaces_in_the_decode_thread():
    updater = ThreadUpdater(adapter())
    updater.adapter.predict(torch.randn(6, 16))
    updater.stage(None, torch.randn(6, 15), torch.ones(6, dtype=torch.bool))  # wrong hidden size
    updater.launch()
    with pytest.raises(RuntimeError):
        updater.wait()
    updater.close()


def test_make_updater_checks_the_mode():
    assert type(make_updater(adapter(), "sync", device=torch.device("cpu"))) is InlineUpdater
    assert type(make_updater(adapter(), "async", device=torch.device("cpu"))) is ThreadUpdater
    with pytest.raises(ValueError, match="esamp.update_mode must be one of \\('sync', 'async'\\), but is 'later'"):
        make_updater(adapter(), "later", device=torch.device("cpu"))
    with pytest.raises(ValueError, match="esamp.update_mode must be one of"):
        AdapterSpec(DistillerSpec(hidden_size=4), update_mode="later")


@pytest.mark.cuda
def test_side_stream_update_equals_sync_on_cuda():
    torch.manual_seed(0)
    pairs = [(torch.randn(6, 16, device="cuda"), torch.randn(6, 16, device="cuda")) for _ in range(6)]

    def cuda_adapter():
        spec = AdapterSpec(DistillerSpec(hidden_size=16, rank=4))
        return TestTimeAdapter(spec, 2, 3, device="cuda", generator=torch.Generator().manual_seed(0), max_steps=50)

    sync = make_updater(cuda_adapter(), "sync", device=torch.device("cuda"))
    side = make_updater(cuda_adapter(), "async", device=torch.device("cuda"))
    assert side.stream is not None and not side.reuses_prediction
    assert [s.tolist() for s in run_steps(sync, pairs)] == [s.tolist() for s in run_steps(side, pairs)]
    for p, q in zip(sync.adapter.bank.parameters(), side.adapter.bank.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
