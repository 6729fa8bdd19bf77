import json
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from esamp_pl import benchmark
from esamp_pl.benchmark import in_situ_costs, kv_cache_bytes, run_benchmark
from tests.conftest import TINY
from tests.pretrain.conftest import write_tiny_model

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
FAST = ["max_new_tokens=4", "n=2", "rounds=2", "hf_rounds=1"]


def config(model_dir: Path, *overrides: str, name: str = "benchmark"):
    tiny = [f"model.name=tiny", f"model.name_or_path={model_dir}", "model.gguf_file=null", "model.package=null",
            "model.sha256=null", "model.chat_template=false"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=[*tiny, *FAST, "num_prompts=2", *overrides])


def random_config(*overrides: str, name: str = "benchmark"):
    """The tiny random Qwen2 of conf/benchmark_shape (what scripts/gpu_check.sh --dry-run runs): no files."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=["benchmark_shape=tiny-qwen2", *FAST, "num_prompts=2", *overrides])


def test_benchmark_alternates_the_modes_and_reports_the_ratios(tmp_path, capsys):
    cfg = config(write_tiny_model(tmp_path / "tiny"))
    summary = run_benchmark(cfg)
    assert {len(summary["rates"][m]) for m in ("off", "on")} == {2} and len(summary["rates"]["hf"]) == 1
    assert {len(summary["cpu_rates"][m]) for m in ("off", "on")} == {2}
    assert summary["updates"] == 2 * 3  # 2 prompts' Distillers x 3 decode steps: the update really runs
    for key in ("esamp_on_off_ratio", "engine_hf_ratio", "tokens_per_s_on", "tokens_per_s_off"):
        assert summary[key] > 0
    assert summary["device"] == "cpu" and summary["paths"]["on"] == "static, eager, async update"
    assert set(summary["extras_ms_per_step"]) == {"distiller_forward", "projection_fusion", "update", "clip_adam",
                                                  "loss_backward"}
    assert "ESamp on / off" in capsys.readouterr().out
    json.dumps(summary)


def test_cpu_time_and_the_extras_share_are_reported(tmp_path):
    summary = run_benchmark(config(write_tiny_model(tmp_path / "tiny"), "hf=false"))
    # CPU time counts every thread: ESamp on does strictly more work than off, per token.
    assert summary["cpu_ms_per_token_on"] > 0 and summary["cpu_ms_per_token_off"] > 0
    assert summary["cpu_time_ratio"] == pytest.approx(summary["cpu_ms_per_token_off"] / summary["cpu_ms_per_token_on"],
                                                      rel=1e-3)
    assert 0 < summary["cpu_time_ratio"] < 5 and 0 < summary["cpu_time_ratio_paired"] < 5
    for key, series in (("cpu_time_ratio", summary["cpu_rates"]), ("esamp_on_off_ratio", summary["rates"])):
        ratios = [on / off for on, off in zip(series["on"], series["off"])]  # rounded rates: compare to 1e-3
        mean = sum(ratios) / len(ratios)
        se = (sum((r - mean) ** 2 for r in ratios) / (len(ratios) - 1) / len(ratios)) ** 0.5
        assert summary[f"{key}_paired_mean"] == pytest.approx(mean, rel=1e-3)
        assert summary[f"{key}_paired_se"] == pytest.approx(se, rel=1e-2, abs=1e-3)
    extras = summary["extras_ms_per_step"]
    step = summary["cpu_step_ms_off"]
    assert summary["extras_share"] == pytest.approx((extras["distiller_forward"] + extras["projection_fusion"]) / step,
                                                    rel=1e-3, abs=1e-5)  # async: the update is off the decode thread
    assert summary["extras_share_total"] > summary["extras_share"] > 0
    assert 0 < summary["cpu_time_ratio_profiled"] < 1
    thread = summary["decode_thread_cpu_ms_per_token"]
    assert 0 < thread["on"] <= summary["cpu_ms_per_token_on"] * 1.01  # the worker's update is not the decode thread's
    assert summary["update_wait_ms_per_step"] >= 0  # measured on the decode thread (CPU worker)
    assert summary["engine_hf_ratio"] is None and "hf" not in summary["rates"]
    assert len(summary["load_average"]["before"]) == 3


def test_sync_update_counts_on_the_decode_thread(tmp_path):
    summary = run_benchmark(config(write_tiny_model(tmp_path / "tiny"), "hf=false", "esamp.update_mode=sync"))
    extras = summary["extras_ms_per_step"]
    on_thread = extras["distiller_forward"] + extras["projection_fusion"] + extras["update"]
    assert summary["extras_share"] == pytest.approx(on_thread / summary["cpu_step_ms_off"], rel=1e-3, abs=1e-5)
    assert summary["update_wait_ms_per_step"] is None and summary["updates"] == 6
    situ = summary["in_situ_ms_per_step"]  # inline: prediction inside scores, the update inside launch
    assert situ["worker"] == 0 and set(situ["parts"]) == {"before_prediction", "scores", "launch"}
    assert situ["parts"]["launch"] > 0 and situ["decode_thread"] == pytest.approx(sum(situ["parts"].values()), abs=1e-3)


def test_in_situ_costs_split_the_calls_by_thread_and_never_count_a_nested_call_twice(tmp_path):
    records = [("scores", True, 0.003), ("predict", True, 0.001),  # an inline prediction, inside scores
               ("launch", True, 0.0005), ("update", True, 0.002),  # an inline update, inside launch
               ("predict", False, 0.0012), ("update", False, 0.004), ("before_prediction", True, 0.0001)]
    costs = in_situ_costs(records, decode_steps=2)
    assert costs["parts"] == {"scores": 1.5, "launch": 0.25, "worker_predict": 0.6, "worker_update": 2.0,
                              "before_prediction": 0.05}
    assert costs["decode_thread"] == pytest.approx(1.8) and costs["worker"] == pytest.approx(2.6)
    summary = run_benchmark(config(write_tiny_model(tmp_path / "tiny"), "hf=false"))  # async: a CPU worker
    situ = summary["in_situ_ms_per_step"]
    # predict_early: the hand-off of the source state to the worker, on the decode thread inside the forward
    assert {"worker_predict", "worker_update", "scores", "launch", "before_prediction",
            "predict_early"} == set(situ["parts"])
    assert situ["worker"] > 0 and situ["decode_thread"] > 0  # the prediction ran on the worker, beside the forward
    step = summary["cpu_step_ms_off"]
    assert summary["extras_share_in_situ"] == pytest.approx(situ["decode_thread"] / step, rel=1e-2, abs=1e-5)
    assert summary["cpu_time_ratio_in_situ"] == pytest.approx(step / (step + situ["decode_thread"] + situ["worker"]),
                                                              rel=1e-3)


def test_random_weights_of_a_shape_and_esamp_without_graphs():
    summary = run_benchmark(random_config("hf=false", "nographs=true", "model.dtype=bfloat16"))
    assert summary["model"] == "random tiny-qwen2" and summary["dtype"] == "bfloat16"
    assert summary["updates_per_mode"] == {"on": 6, "on_nographs": 6}
    assert summary["paths"]["on_nographs"] == "static, eager, async update" and summary["graphs_ratio"] > 0


def test_sweep_measures_every_point_and_plots_share_vs_rows(tmp_path, capsys):
    plot = tmp_path / "sweep.png"
    summary = run_benchmark(random_config("sweep=[[1,1],[3,2]]", f"plot={plot}", "rounds=1", "warmup=0"))
    points = summary["points"]
    assert [(p["prompts"], p["n"], p["rows"]) for p in points] == [(1, 1, 1), (3, 2, 6)]
    assert [p["updates"] for p in points] == [1 * 3, 3 * 3]  # one Distiller per prompt, 3 decode steps
    assert all(0 < p["extras_share"] < p["extras_share_total"] and p["cpu_time_ratio"] > 0 for p in points)
    assert summary["skipped"] == [] and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "CPU-time ratio" in table and "      3 x 2        6" in table
    with pytest.raises(ValueError, match="exists and is never overwritten"):  # checked before anything runs
        run_benchmark(random_config("sweep=[[1,1]]", f"plot={plot}"))


def test_sweep_skips_a_point_whose_cache_does_not_fit(monkeypatch, tmp_path):
    monkeypatch.setattr(benchmark, "MEMORY_SHARE", 0.0)
    summary = run_benchmark(random_config("sweep=[[2,2]]", f"plot={tmp_path / 'p.png'}", "rounds=1"))
    assert summary["points"] == [] and summary["skipped"][0]["prompts"] == 2
    assert "KV cache" in summary["skipped"][0]["reason"] and not (tmp_path / "p.png").exists()


def test_kv_cache_bytes_counts_layers_heads_and_dtype():
    from transformers import LlamaConfig

    config = LlamaConfig(**TINY)  # 2 layers, 2 KV heads of 64 / 4 = 16
    assert kv_cache_bytes(config, rows=3, positions=10, dtype=torch.bfloat16) == 3 * 10 * 2 * 2 * 2 * 16 * 2


def test_bad_benchmark_settings_fail_before_the_model_loads(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="engine must be one of"):
        run_benchmark(config(missing, "engine=fast"))
    with pytest.raises(ValueError, match="hf_rounds must be in \\[1, rounds=2\\], but is 3"):
        run_benchmark(config(missing, "hf_rounds=3"))
    with pytest.raises(ValueError, match="num_prompts must be in \\[1, 8\\]"):
        run_benchmark(config(missing, "num_prompts=9"))
    with pytest.raises(ValueError, match="sweep must be a list of \\[prompts, n\\] pairs"):
        run_benchmark(config(missing, "sweep=[[4,0]]"))
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        run_benchmark(config(missing, "threads=0"))


def test_gpu_preset_is_the_papers_setting():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="benchmark_gpu", overrides=["benchmark_shape=qwen2.5-7b"])
    assert (cfg.model.name, cfg.device, cfg.num_prompts, cfg.n, cfg.max_new_tokens) == ("qwen2.5-7b", "cuda", 8, 16, 256)
    assert cfg.esamp.beta == 0.25 and cfg.esamp.update_mode == "async" and cfg.esamp.scope == "per_prompt"
    assert cfg.nographs and cfg.cuda_graphs and cfg.model.dtype == "bfloat16"
    shape = cfg.benchmark_shape.config
    assert (shape.hidden_size, shape.num_hidden_layers, shape.num_key_value_heads, shape.vocab_size) == (
        3584, 28, 4, 152064)


def test_sweep_preset_covers_the_papers_points():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="benchmark_sweep")
    assert [tuple(p) for p in cfg.sweep] == [(1, 1), (4, 8), (8, 16), (32, 16)] and cfg.max_new_tokens == 256


def test_gpu_check_script_parses_and_explains_itself():
    script = ROOT / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "--dry-run OUT" in usage.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_benchmark_runs_the_graphs_and_the_side_stream_update():
    summary = run_benchmark(random_config("device=cuda", "threads=null", "hf=false", "nographs=true",
                                          name="benchmark_gpu"))
    assert summary["paths"]["on"] == "static, cuda graphs, async update", summary["paths"]
    assert summary["paths"]["on_nographs"] == "static, eager, async update"
    assert summary["updates_per_mode"] == {"on": 2 * 3, "on_nographs": 2 * 3}
    assert summary["extras_share"] > 0 and summary["graphs_ratio"] > 0 and summary["device"].startswith("cuda")
