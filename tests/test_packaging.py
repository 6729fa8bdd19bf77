"""Package paths (esamp_pl.resources), the console commands, and where checkpoints are looked for and written."""

from __future__ import annotations

import glob
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from esamp_pl import checkpoint, commands, resources
from esamp_pl.distiller import DistillerSpec
from tests.test_api import save_for, tiny_pair

REPO = Path(__file__).resolve().parents[1]


def test_package_data_links_are_the_repositorys_folders():
    for name in ("conf", "checkpoints", "scripts"):
        assert (REPO / "esamp_pl" / name).resolve() == (REPO / name).resolve()
    assert resources.source_checkout() == REPO
    assert (resources.CONF_DIR / "config.yaml").is_file()
    assert sorted(p.name for p in resources.SHIPPED_CHECKPOINTS_DIR.iterdir()) == ["qwen2.5-coder-0.5b", "smollm2-135m"]


def test_the_wheel_declares_every_config_checkpoint_and_console_command():
    """Each file under conf/ and checkpoints/ matches a package-data pattern (a new kind of file would be lost)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["esamp_pl"]
    declared = {Path(name) for pattern in patterns
                for name in glob.glob(pattern, root_dir=REPO / "esamp_pl", recursive=True)}
    files = {p.relative_to(REPO) for folder in ("conf", "checkpoints", "scripts") for p in (REPO / folder).rglob("*")
             if p.is_file() and p.suffix != ".sh" and "__pycache__" not in p.parts}
    assert len(files) > 30 and files <= declared, sorted(files - declared)
    scripts = project["project"]["scripts"]
    assert scripts == {"esamp-generate": "esamp_pl.commands:generate", "esamp-pretrain": "esamp_pl.commands:pretrain",
                       "esamp-evaluate": "esamp_pl.commands:evaluate", "esamp-benchmark": "esamp_pl.commands:benchmark"}


@pytest.mark.parametrize("command, config_key", [(commands.generate, "max_new_tokens"), (commands.pretrain, "trainer"),
                                                  (commands.evaluate, "eval"), (commands.benchmark, "rounds")])
def test_console_commands_run_the_entry_scripts_with_the_packaged_configs(command, config_key, monkeypatch, capsys,
                                                                          tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["esamp-x", "--cfg", "job"])
    command()
    assert f"{config_key}:" in capsys.readouterr().out


def test_user_checkpoints_come_first_and_new_ones_never_go_into_an_installed_package(monkeypatch, tmp_path):
    monkeypatch.setenv("ESAMP_PL_CACHE", str(tmp_path / "cache"))
    user = tmp_path / "cache" / "checkpoints"
    assert resources.checkpoint_dirs() == [user, REPO / "checkpoints"]
    assert checkpoint.default_checkpoints_dir() == REPO / "checkpoints"  # a checkout: beside the shipped ones
    monkeypatch.setattr(resources, "source_checkout", lambda: None)  # as in an installed wheel
    assert checkpoint.default_checkpoints_dir() == user
    assert resources.checkpoint_dirs() == [user, resources.SHIPPED_CHECKPOINTS_DIR]
    shipped = checkpoint.find_checkpoint("smollm2-135m", "paper", spec=DistillerSpec(hidden_size=576))
    assert shipped.parent.parent == resources.SHIPPED_CHECKPOINTS_DIR
    model, _ = tiny_pair()
    mine = save_for(model, user, {"x": torch.zeros(1)}, rank=8)  # found by name: the weights are not read
    assert checkpoint.find_checkpoint("my-notebook-model", "paper", spec=DistillerSpec(hidden_size=64, rank=8)) == mine
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="no pre-trained Distiller for model 'other'"):
        checkpoint.find_checkpoint("other", "paper")
