"""Meta-train a Distiller init for online adaptation (Reptile over replayed generation episodes).

    python scripts/pretrain_meta.py                                   # SmolLM2, CPU, 64 prompts x 8 samples
    python scripts/pretrain_meta.py init_from=checkpoints/smollm2-135m/paper-r64.distiller.safetensors
    python scripts/pretrain_meta.py trainer=gpu model=qwen2.5-coder-0.5b

Running the same command again resumes an interrupted run. See esamp_pl/pretrain/meta.py.
"""

import hydra
from omegaconf import DictConfig

from esamp_pl.cli import script_main
from esamp_pl.pretrain.meta import run_meta_pretraining
from esamp_pl.resources import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="pretrain_meta")
@script_main
def main(cfg: DictConfig) -> None:
    path = run_meta_pretraining(cfg)
    if path is not None:
        print(path)


if __name__ == "__main__":
    main()
