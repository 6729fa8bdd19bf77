"""Does the Distiller's error track novelty? Spearman of signal and novelty per init (esamp_pl.novelty).

    python scripts/diagnose_novelty.py threads=1                                 # SmolLM2, 12 creative prompts
    python scripts/diagnose_novelty.py model=qwen2.5-coder-0.5b limit=8 threads=1
    python scripts/diagnose_novelty.py inits=[random,warm] betas=[0] kl_budgets=[0.05]

Prints a Markdown table, then (last line) the JSON report {"inits": {"<init>": {"spearman": ...}}}.
"""

import hydra
from omegaconf import DictConfig

from esamp_pl.cli import script_main
from esamp_pl.files import dumps_json
from esamp_pl.novelty import format_table, run_diagnostic
from esamp_pl.resources import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="diagnose")
@script_main
def main(cfg: DictConfig) -> None:
    report = run_diagnostic(cfg)
    print(format_table(report))
    print(dumps_json(report))


if __name__ == "__main__":
    main()
