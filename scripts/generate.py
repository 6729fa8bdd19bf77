"""Generate n samples per prompt with ESamp (or plain sampling). Config: conf/config.yaml.

    python scripts/generate.py                                  # offline default model, ESamp on
    python scripts/generate.py esamp.enabled=false n=8          # plain sampling baseline
    python scripts/generate.py model=qwen3-8b device=cuda prompts=my_prompts.txt output=out.jsonl
"""

import logging

import hydra
from omegaconf import DictConfig

from esamp_pl.cli import script_main
from esamp_pl.generation import run_generation, summary_line
from esamp_pl.resources import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
@script_main
def main(cfg: DictConfig) -> None:
    run = run_generation
    if cfg.get("engine") == "vllm":  # ESamp inside vLLM (its own venv: scripts/install_vllm.sh)
        from esamp_pl.vllm import generate_with_vllm as run
    summary = run(cfg)
    logging.getLogger(__name__).info("wrote %s", cfg.output)
    print(summary_line(summary))


if __name__ == "__main__":
    main()
