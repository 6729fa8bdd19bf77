"""scripts/evaluate.py end to end on a tiny random Llama with a tiny word-level tokenizer (seconds)."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from esamp_pl.evaluation.results import read_records
from esamp_pl.evaluation.runner import build_methods, check_compare_pairs, method_key, run_evaluation
from esamp_pl.evaluation.stats import FROZEN_TWIN_KEYS
from tests.evaluation.conftest import usable_sandbox

CONF = str(Path(__file__).resolve().parents[2] / "conf")
WORDS = ("the a of and to in is it that was for on with as he she they at by this from or an be story sea "
         "light ship night keeper door old new time day man woman city rain wind fire def return if else "
         "for while list int str x y n i ( ) : , . = + - [ ] ``` python \" ' # > < 0 1 2").split()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama and a word-level tokenizer saved as an ordinary HF folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<pad>", "</s>", *dict.fromkeys(WORDS)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=1, eos_token_id=2, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def config(model_dir: Path, out: Path, *overrides: str):
    tiny = [f"model.name=tiny", f"model.name_or_path={model_dir}", "model.gguf_file=null", "model.package=null",
            "model.sha256=null", "model.chat_template=false"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="evaluate", overrides=[*tiny, f"output_dir={out}", "progress=false",
                                                          "eval.limit=2", "n=2", "eval.max_new_tokens=6",
                                                          "eval.batch_prompts=1", *overrides])


SANDBOX = usable_sandbox()


def problems(path: Path) -> list[dict]:
    return [r for r in read_records(path) if r["kind"] == "problem"]


def test_creative_all_methods_report_and_resume(tiny_model_dir, tmp_path):
    cfg = config(tiny_model_dir, tmp_path,
                 "eval.methods=[min_p0.1,esamp_random,esamp_warm,esamp_svd,sharpen_only,esamp_frozen]")
    out = run_evaluation(cfg)
    results = out / "results.jsonl"
    names = [m.name for m in build_methods(cfg)]
    assert "min_p0.1@T0.7" in names and "esamp_random@beta0.5" in names
    info = json.loads((out / "run_info.json").read_text())
    assert set(info["skipped"]) == {"esamp_warm"} and "CheckpointNotFoundError" in info["skipped"]["esamp_warm"]
    records = problems(results)
    ran = [n for n in names if n != "esamp_warm"]
    assert sorted((r["method"], r["problem_id"]) for r in records) == sorted(
        (n, p) for n in ran for p in ("creative/lighthouse-keeper", "creative/last-library-card"))
    for r in records:
        assert len(r["samples"]) == 2 and r["num_correct"] is None and r["diversity"]["vendi"] >= 1 - 1e-6
        assert all(s["perplexity"] is None or s["perplexity"] > 0 for s in r["samples"])
    batches = [r for r in read_records(results) if r["kind"] == "batch"]
    esamp_batches = [b for b in batches if b["method"] == "esamp_random"]
    assert all(b["distiller_updates"] > 0 and len(b["relative_error_per_step"]) == b["decode_steps"]
               for b in esamp_batches)
    assert all(b["distiller_updates"] == 0 for b in batches if b["method"] == "esamp_frozen")
    assert all(b["loss_per_step"] is None for b in batches if b["method"] in ("min_p0.1", "sharpen_only"))

    report = (out / "report.md").read_text()
    assert "| `esamp_random` |" in report and "esamp_warm`: skipped" in report and "Fair comparison" in report
    assert all((out / f).is_file() for f in ("diversity_vs_perplexity.png", "distiller_error.png"))
    assert not (out / "pass_at_k.png").exists()

    # A finished run is not redone; a torn tail (the last batch of the last method) is redone alone, identically.
    lines = results.read_text().splitlines()
    run_evaluation(config(tiny_model_dir, tmp_path, "report=false",
                          "eval.methods=[min_p0.1,esamp_random,esamp_warm,esamp_svd,sharpen_only,esamp_frozen]"))
    assert results.read_text().splitlines() == lines
    results.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:20])
    run_evaluation(cfg)
    again = results.read_text().splitlines()
    assert len(problems(results)) == len(records)
    assert json.loads(again[-2]) == json.loads(lines[-2])  # same problem record: same tokens, scores, metrics

    # A damaged problem line (a torn UTF-8 character) and a line of the wrong shape: skipped, reported, and the
    # damaged problem is decoded again, identically.
    first = next(i for i, line in enumerate(again) if json.loads(line)["kind"] == "problem")
    damaged = again[first].encode().replace(b'"samples"', b'"sam\xc3ples"', 1)
    results.write_bytes(b"\n".join([line.encode() for line in again[:first]] + [damaged]
                                    + [line.encode() for line in again[first + 1:]])
                        + b'\n{"kind": "problem", "method": "min_p0.1"}\n')
    run_evaluation(cfg)
    redone = [json.loads(line) for line in results.read_bytes().split(b"\n")[len(again) + 1:] if line.strip()]
    assert [r for r in redone if r["kind"] == "problem"] == [json.loads(again[first])]
    report = (out / "report.md").read_text()
    assert f"- line {first + 1}: not UTF-8" in report and f"- line {len(again) + 1}: problem record without" in report


def test_humaneval_pass_at_k_with_a_separate_scorer(tiny_model_dir, tmp_path):
    out = run_evaluation(config(tiny_model_dir, tmp_path, "eval=humaneval", "eval.max_new_tokens=4",
                                "eval.methods=[min_p0.1,esamp_random]", f"scorer={tiny_model_dir}",
                                f"sandbox={SANDBOX}"))
    records = problems(out / "results.jsonl")
    assert len(records) == 4 and all(r["num_correct"] == 0 for r in records)  # random weights pass nothing
    assert all(r["scorer"] == tiny_model_dir.name for r in records)
    assert any(s["perplexity"] for r in records for s in r["samples"])  # re-tokenized text, scored
    report = (out / "report.md").read_text()
    assert "pass@1" in report and "pass@2" in report
    assert "## pass@k against `min_p0.1`" in report and f"code executed with sandbox = {SANDBOX}" in report
    assert "| `esamp_random` | +0.000 ± 0.000 | +0.000 ± 0.000 | 0 / 0 |" in report  # both solve nothing
    assert (out / "pass_at_k.png").is_file()


def test_creative_with_the_users_prompts(tiny_model_dir, tmp_path):
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text('{"prompt": "the old ship"}\n{"prompt": "a new city"}\n{"prompt": "rain and wind"}\n')
    out = run_evaluation(config(tiny_model_dir, tmp_path / "out", "eval.methods=[min_p0.1]", "eval.sweeps=[]",
                                f"eval.prompts={prompts}", "eval.limit=null"))
    info = json.loads((out / "run_info.json").read_text())
    assert len(info["problems"]) == 3 and all(p.startswith("creative/user-") for p in info["problems"])
    assert sorted(r["problem_id"] for r in problems(out / "results.jsonl")) == sorted(info["problems"])
    assert f"the user's prompts from `{prompts}`" in (out / "report.md").read_text()


def test_perplexity_can_be_switched_off(tiny_model_dir, tmp_path):
    out = run_evaluation(config(tiny_model_dir, tmp_path, "eval.methods=[min_p0.1]", "perplexity=false"))
    records = problems(out / "results.jsonl")
    assert records and all(s["perplexity"] is None for r in records for s in r["samples"])
    report = (out / "report.md").read_text()
    assert "| `min_p0.1` |" in report and "perplexity scorer: none (perplexity=false)" in report
    assert not (out / "diversity_vs_perplexity.png").exists()  # nothing to put on its x axis


def test_resume_key_follows_the_samples_not_the_speed(tmp_path):
    def key(*overrides: str) -> str:
        cfg = config(tmp_path, tmp_path / "out", "eval.methods=[esamp_random]", "eval.sweeps=[]", *overrides)
        (method,) = build_methods(cfg)
        return method_key(cfg, method)

    base = key()
    assert key("esamp.update_mode=sync") == base  # async and sync updates give the same tokens
    assert key("threads=1", "engine=static") == base
    assert key("esamp.optimizer.lr=0.001") != base  # the method keeps the base group's optimizer
    assert key("seed=1") != base and key("distiller.rank=32") != base
    assert key("perplexity=false") != base and key("embedder=/some/other/embedder") != base  # other metrics


def write_user_checkpoint(tmp_path: Path, model, seed: int) -> None:
    """A rank-8 warm start for the tiny model in the user's checkpoint folder (ESAMP_PL_CACHE=tmp_path/cache, set
    by the caller), found by model name as the decode finds it; ``seed`` draws its weights."""
    import dataclasses

    from esamp_pl.checkpoint import CheckpointMeta, save_checkpoint
    from esamp_pl.distiller import DistillerBank, DistillerSpec
    from esamp_pl.models import model_fingerprint

    spec = DistillerSpec(hidden_size=64, rank=8)
    state = DistillerBank(spec, 1, generator=torch.Generator().manual_seed(seed)).single_state()
    meta = CheckpointMeta(model_name="tiny", model_id="local/tiny", model_fingerprint=model_fingerprint(model.config),
                          sites="paper", distiller=dataclasses.asdict(spec), steps=seed)
    save_checkpoint(tmp_path / "cache" / "checkpoints" / "tiny" / "paper-r8.distiller.safetensors", state, meta)


def test_a_replaced_warm_start_checkpoint_makes_its_records_stale(tmp_path, tiny_llama, monkeypatch):
    """The resume key names the checkpoint's contents, not only its path: re-training it in place must not mix
    the old checkpoint's records with the new one's."""
    monkeypatch.setenv("ESAMP_PL_CACHE", str(tmp_path / "cache"))  # the user's checkpoint folder, searched first

    def write(seed: int) -> None:
        write_user_checkpoint(tmp_path, tiny_llama, seed)

    def keys() -> dict[str, str]:
        cfg = config(tmp_path, tmp_path / "out", "eval.methods=[esamp_warm,esamp_random]", "eval.sweeps=[]",
                     "distiller.rank=8")  # esamp_warm finds the file by model name, as the decode does
        return {m.name: method_key(cfg, m) for m in build_methods(cfg)}

    missing = keys()
    write(seed=1)
    first = keys()
    assert keys() == first  # the same file, the same key: a resume reuses its records
    write(seed=2)
    second = keys()
    assert second["esamp_warm"] != first["esamp_warm"] != missing["esamp_warm"]
    assert missing["esamp_random"] == first["esamp_random"] == second["esamp_random"]  # no warm start, key unchanged


def test_a_warm_start_of_another_width_is_unavailable_without_its_own_checkpoint(tmp_path, tiny_llama, monkeypatch):
    """Whether a warm method can run is told before the model loads; it must look for a checkpoint of the
    method's own Distiller width, as its decode will, not take the rank-64 file for a rank-16 method."""
    import dataclasses

    from esamp_pl.evaluation.runner import _unavailable
    from esamp_pl.models import ModelSpec

    monkeypatch.setenv("ESAMP_PL_CACHE", str(tmp_path / "cache"))
    write_user_checkpoint(tmp_path, tiny_llama, seed=1)
    cfg = config(tmp_path, tmp_path / "out", "eval.methods=[esamp_warm]", "eval.sweeps=[]", "distiller.rank=8")
    (warm,) = build_methods(cfg)
    model_spec = ModelSpec.from_config(cfg.model)
    assert _unavailable(warm, model_spec) is None  # rank 8: its file is there
    wide = dataclasses.replace(warm, distiller={**warm.distiller, "rank": 16})
    reason = _unavailable(wide, model_spec)
    assert reason is not None and reason.startswith("CheckpointNotFoundError") and "r16" in reason


def test_a_method_may_set_its_own_distiller(tmp_path):
    """A catalogue entry's `distiller` overrides reach its decode settings and resume key, and only its own."""
    from esamp_pl.evaluation.runner import decode_settings_for

    cfg = config(tmp_path, tmp_path / "out", "eval.methods=[esamp_random,esamp_random_r384,min_p0.1]", "eval.sweeps=[]")
    base, wide, plain = build_methods(cfg)
    assert base.distiller["rank"] == 64 and wide.distiller == {**base.distiller, "rank": 384}
    assert decode_settings_for(cfg, wide).esamp.adapter.distiller.rank == 384
    assert decode_settings_for(cfg, base).esamp.adapter.distiller.rank == 64
    assert method_key(cfg, wide) != method_key(cfg, base)
    # the run's own distiller group still applies to methods that do not override it
    narrow = config(tmp_path, tmp_path / "out", "eval.methods=[esamp_random,esamp_random_r384]", "eval.sweeps=[]",
                    "distiller.rank=32")
    assert [m.distiller["rank"] for m in build_methods(narrow)] == [32, 384]
    with pytest.raises(ValueError, match="may only override `sampling`, `esamp` and `distiller`, not \\['model'\\]"):
        build_methods(config(tmp_path, tmp_path / "out", "eval.methods=[bad]", "eval.sweeps=[]",
                             "+methods.bad={model: {name: x}}"))


def test_methods_of_two_distiller_widths_run_side_by_side(tiny_model_dir, tmp_path):
    out = run_evaluation(config(tiny_model_dir, tmp_path / "out", "eval.methods=[esamp_random,esamp_frozen_r384]",
                                "eval.sweeps=[]", "eval.limit=1", "methods.esamp_frozen_r384.distiller.rank=16"))
    batches = {r["method"]: r for r in read_records(out / "results.jsonl") if r["kind"] == "batch"}
    assert batches["esamp_random"]["distiller_updates"] > 0 and batches["esamp_frozen_r384"]["distiller_updates"] == 0
    info = json.loads((out / "run_info.json").read_text())
    assert [m["distiller"]["rank"] for m in info["methods"]] == [64, 16]
    report = (out / "report.md").read_text()
    assert "| `esamp_random` | 1.00 | 0.25 | random r64 |" in report
    assert "| `esamp_frozen_r384` | 1.00 | 0.25 | random r16 |" in report


@pytest.mark.parametrize("override, message", [
    ("eval.methods=[temp1.0,nucleus]", "unknown method 'nucleus'"),
    ("eval.sweeps=[{method: min_p0.1, key: sampling.min_p, values: [1.5]}]", "min_p0.1@min_p1.5.*min_p has to be"),
    ("eval.sweeps=[{method: min_p0.1, key: temperature, values: [0.7]}]", "sampling.<field>"),
    ("eval.sweeps=[{method: min_p0.1, key: sampling.temperature, values: [1.0, 1.0]}]", "appear twice"),
    ("eval.batch_prompts=0", "eval.batch_prompts must be an integer >= 1"),
    ("eval.compare=[[min_p0.1,esamp_nope]]", "eval.compare: \\['esamp_nope'\\] not among this run's methods"),
    ("eval.compare=[[min_p0.1]]", "eval.compare: every entry must be a pair"),
    ("threads=0", "threads must be a positive integer"),
    ("engine=fast", "engine must be one of"),
    ("sandbox=docker", "sandbox must be one of"),
])
def test_bad_method_config_fails_before_loading(tmp_path, override, message):
    cfg = config(tmp_path / "no-model-here", tmp_path / "out", override)
    with pytest.raises(ValueError, match=message):
        run_evaluation(cfg)
    assert not (tmp_path / "out").exists()


def test_a_run_needs_a_method_or_a_sweep(tmp_path):
    cfg = config(tmp_path / "no-model-here", tmp_path / "out", "eval.methods=[]", "eval.sweeps=[]")
    with pytest.raises(ValueError, match="eval.methods and eval.sweeps are both empty"):
        run_evaluation(cfg)
    sweeps_only = config(tmp_path / "no-model-here", tmp_path / "out", "eval.methods=[]",
                         "eval.sweeps=[{method: min_p0.1, key: sampling.temperature, values: [0.7]}]")
    assert [m.name for m in build_methods(sweeps_only)] == ["min_p0.1@T0.7"]


def test_humaneval_without_bubblewrap_fails_before_loading(tmp_path, monkeypatch):
    from esamp_pl.evaluation import execution

    monkeypatch.setattr(execution.shutil, "which", lambda name: None)
    execution._probe_bwrap.cache_clear()
    try:
        with pytest.raises(execution.SandboxError, match="apt-get install -y bubblewrap"):
            run_evaluation(config(tmp_path / "no-model-here", tmp_path / "out", "eval=humaneval"))
    finally:
        execution._probe_bwrap.cache_clear()
    assert not (tmp_path / "out").exists()


def test_seeds_pool_problem_seed_units_with_kl_budget_sweeps_and_resume(tiny_model_dir, tmp_path):
    methods = ["eval.methods=[min_p0.1,esamp_random,esamp_frozen]",
               "eval.sweeps=[{method: esamp_random, key: esamp.kl_budget, values: [0.1]},"
               "{method: esamp_frozen, key: esamp.kl_budget, values: [0.1]}]"]
    single = run_evaluation(config(tiny_model_dir, tmp_path / "single", *methods, "report=false"))
    methods.append("eval.compare=[[esamp_random@kl0.1,esamp_random]]")
    out = run_evaluation(config(tiny_model_dir, tmp_path / "pooled", *methods, "eval.seeds=[0]", "report=false"))
    results = out / "results.jsonl"
    first = results.read_text().splitlines()
    # seeds=[0] decodes what the single-seed run of seed 0 decodes (batch b still uses seed + b)
    texts = lambda path: {(r["method"], r["problem_id"]): [s["text"] for s in r["samples"]] for r in problems(path)}
    assert texts(results) == texts(single / "results.jsonl")

    cfg = config(tiny_model_dir, tmp_path / "pooled", *methods, "eval.seeds=[0,1]")
    assert "esamp_random@kl0.1" in [m.name for m in build_methods(cfg)]
    run_evaluation(cfg)
    assert results.read_text().splitlines()[:len(first)] == first  # seed 0 kept, only seed 1 decoded
    records = problems(results)
    pids = ("creative/lighthouse-keeper", "creative/last-library-card")
    assert sorted((r["method"], r["unit"]) for r in records) == sorted(
        (m, f"{p}@seed{s}") for m in ("min_p0.1", "esamp_random", "esamp_frozen", "esamp_random@kl0.1",
                                      "esamp_frozen@kl0.1") for p in pids for s in (0, 1))
    assert {(r["unit"], r["seed"]) for r in records} == {(f"{p}@seed{s}", s + b) for b, p in enumerate(pids)
                                                         for s in (0, 1)}
    batches = [r for r in read_records(results) if r["kind"] == "batch"]
    budgets = [b["kl_budget"] for b in batches if b["method"].endswith("@kl0.1")]
    assert len(budgets) == 8 and all(k["budget"] == 0.1 and k["row_steps"] > 0 for k in budgets)
    assert all(b["kl_budget"] is None for b in batches if not b["method"].endswith("@kl0.1"))

    report = (out / "report.md").read_text()
    assert "units (problem x seed, seeds [0, 1]): 4 common to all methods (of 4; 2 problems" in report
    assert "## Against the frozen twin" in report
    assert "| `esamp_random` | `esamp_frozen` |" in report and "| `esamp_random@kl0.1` | `esamp_frozen@kl0.1` |" in report
    row = next(line for line in report.splitlines() if line.startswith("| `esamp_random@kl0.1` | 1.00 | KL 0.1 |"))
    assert row.split(" | ")[-1].strip(" |") != "-"  # realised beta / KL shown
    # the chosen pair, against an independent computation of its paired Vendi difference
    pair = next(line for line in report.splitlines() if line.startswith("| `esamp_random@kl0.1` | `esamp_random` |"))
    assert report.index("## Chosen pairs") < report.index(pair)
    vendi = {(r["method"], r["unit"]): r["diversity"]["vendi"] for r in records}
    units = sorted({r["unit"] for r in records})
    diffs = [vendi[("esamp_random@kl0.1", u)] - vendi[("esamp_random", u)] for u in units]
    assert pair.split(" | ")[2].startswith(f"{sum(diffs) / len(diffs):+.3f} ± ")
    assert next(line for line in report.splitlines() if line.startswith("| `min_p0.1` | 1.00 |")).endswith("| - |")


@pytest.mark.parametrize("seeds", ["[]", "[0,0]", "[0.5]"])
def test_bad_seeds_fail_before_loading(tmp_path, seeds):
    with pytest.raises(ValueError, match="eval.seeds must be null or a non-empty list of distinct integers"):
        run_evaluation(config(tmp_path / "no-model-here", tmp_path / "out", f"eval.seeds={seeds}"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(CONF) / "eval").glob("*.yaml")))
def test_every_shipped_eval_config_builds_its_methods(tmp_path, name):
    """A method name or sweep key mistyped in conf/eval/*.yaml fails here, not hours into a run."""
    cfg = config(tmp_path / "no-model-here", tmp_path / "out", f"eval={name}")
    methods = build_methods(cfg)
    assert methods and len({m.name for m in methods}) == len(methods)
    check_compare_pairs(cfg, methods)  # eval.compare names only methods of the run
    # every learning warm-start method of a budget sweep has its frozen twin: same settings, learn false
    if name.startswith("creative_budget"):
        for m in methods:
            if m.esamp.get("enabled") and m.esamp.get("mode") == "esamp" and m.esamp.get("learn") \
                    and m.esamp.get("init") == "warm":
                # the report's own rule: a frozen twin differs in learn only (a frozen Distiller has no cadence)
                same = lambda o: {k: v for k, v in o.esamp.items() if k not in FROZEN_TWIN_KEYS}
                assert any(not o.esamp.get("learn") and same(o) == same(m) and o.sampling == m.sampling
                           and o.distiller == m.distiller for o in methods), f"{m.name} has no frozen twin"
