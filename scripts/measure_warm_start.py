"""Distiller relative error over the first 32 / 128 decode steps for the random, warm and svd inits.

    python scripts/measure_warm_start.py esamp.beta=0 max_new_tokens=128 n=4   # same tokens for every init
    python scripts/measure_warm_start.py model=qwen2.5-coder-0.5b max_new_tokens=128

Uses conf/config.yaml (the generate.py settings); prints a JSON report (per-step curves included).
"""

import hydra
from omegaconf import DictConfig

from esamp_pl.cli import script_main
from esamp_pl.files import dumps_json
from esamp_pl.pretrain.compare import compare_inits
from esamp_pl.resources import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
@script_main
def main(cfg: DictConfig) -> None:
    report = compare_inits(cfg)
    for kind, row in report["inits"].items():
        print(f"{kind:>6}: " + "  ".join(f"{k}={v:.4f}" for k, v in row.items()
                                         if k.startswith("relative_error_first") and v is not None))
    print(dumps_json(report))


if __name__ == "__main__":
    main()
