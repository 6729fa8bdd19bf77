"""ESamp's overhead and the engine's speed, in one process. Config: conf/benchmark.yaml.

    python scripts/benchmark.py                                  # CPU, offline model, 4 prompts x 8 x 64
    python scripts/benchmark.py --config-name benchmark_sweep    # growth: 1x1 .. 32x16 prompts x n, 256 tokens, PNG
    python scripts/benchmark.py --config-name benchmark_gpu      # GPU, Qwen2.5-7B, 8 prompts x 16 x 256
    python scripts/benchmark.py --config-name benchmark_gpu benchmark_shape=qwen2.5-7b   # same, random weights
    python scripts/benchmark.py engine=eager esamp.update_mode=sync rounds=9

The last line printed is a JSON summary (esamp_on_off_ratio, cpu_time_ratio, extras_share, engine_hf_ratio,
updates, tokens/s, device); with a sweep, {"points": [...]}.
"""

import json

import hydra
from omegaconf import DictConfig

from esamp_pl.benchmark import run_benchmark
from esamp_pl.cli import script_main
from esamp_pl.resources import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="benchmark")
@script_main
def main(cfg: DictConfig) -> None:
    run = run_benchmark
    if cfg.get("engine") == "vllm":  # ESamp on / off inside vLLM (its own venv: scripts/install_vllm.sh)
        from esamp_pl.vllm import benchmark as run
    print(json.dumps(run(cfg)))


if __name__ == "__main__":
    main()
