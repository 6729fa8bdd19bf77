"""Pre-train a Distiller for a model and export it (for esamp.warm_start_path=). Config: conf/pretrain.yaml.

    python scripts/pretrain_distiller.py                                   # smollm2-135m, offline, CPU
    python scripts/pretrain_distiller.py export.dir=checkpoints export.overwrite=true  # replace the shipped one
    python scripts/pretrain_distiller.py model=qwen2.5-coder-0.5b data.num_prompts=128
    python scripts/pretrain_distiller.py model=llama3-8b trainer=gpu       # needs the weights and a GPU
    python scripts/pretrain_distiller.py data=files 'data.paths=[my_text/]' trainer=ddp trainer.devices=4
"""

import hydra
from omegaconf import DictConfig

from esamp_pl.cli import script_main
from esamp_pl.pretrain.run import run_pretraining
from esamp_pl.resources import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="pretrain")
@script_main
def main(cfg: DictConfig) -> None:
    path = run_pretraining(cfg)
    if path is not None:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
