"""Evaluate sampling methods on one task and write a report. Config: conf/evaluate.yaml, conf/eval/.

    python scripts/evaluate.py eval=creative n=8                       # all methods, offline default model
    python scripts/evaluate.py eval=humaneval model=qwen2.5-coder-0.5b eval.limit=20 \
        'eval.methods=[temp1.0,min_p0.1,esamp_random]'
    python scripts/evaluate.py eval=gsm8k eval.limit=2 output_dir=runs/quick   # rerun = resume
"""

import logging

import hydra
from omegaconf import DictConfig

from esamp_pl.cli import script_main
from esamp_pl.evaluation.runner import run_evaluation
from esamp_pl.resources import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
@script_main
def main(cfg: DictConfig) -> None:
    out_dir = run_evaluation(cfg)
    logging.getLogger(__name__).info("results and report in %s", out_dir)
    print(out_dir / "report.md")


if __name__ == "__main__":
    main()
