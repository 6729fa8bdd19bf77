"""Fixtures for the vLLM plugin tests: one in-process ``vllm.LLM`` on the bundled SmolLM2 per session.

These tests need vLLM (``scripts/install_vllm.sh``) and skip cleanly without it, unless
``ESAMP_REQUIRE_VLLM=1`` (set by ``.ci/run`` in the vLLM venv): then a missing vLLM is an error, so a
broken vLLM install cannot pass CI as skipped tests. vLLM runs in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the tests can read the plugin's state directly,
on one core (``VLLM_CPU_OMP_THREADS_BIND``), with a small context and KV cache.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

VLLM_MODULE = "vllm.sampling_params"
"a module of the real vLLM: without vLLM, ``import vllm`` may find this test folder as a namespace package"
CONF_MODEL = Path(__file__).resolve().parents[2] / "conf" / "model" / "smollm2-135m.yaml"
PLUGIN_SETTINGS = {"record_steps": 4096}
REQUIRE_VLLM = "ESAMP_REQUIRE_VLLM"


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "vllm: needs vLLM with the esamp_pl plugin (scripts/install_vllm.sh)")
    if os.environ.get(REQUIRE_VLLM) == "1" and not vllm_available():
        raise pytest.UsageError(f"{REQUIRE_VLLM}=1 but vLLM is not importable from {sys.executable}; "
                                "run the tests with the venv of scripts/install_vllm.sh")


def vllm_available() -> bool:
    try:
        return importlib.util.find_spec(VLLM_MODULE) is not None
    except ImportError:
        return False


@pytest.fixture(scope="session")
def model_path() -> str:
    from omegaconf import OmegaConf

    from esamp_pl.models import ModelSpec
    from esamp_pl.vllm.offline import model_folder

    return model_folder(ModelSpec.from_config(OmegaConf.load(CONF_MODEL)))


@pytest.fixture(scope="session")
def llm(model_path):
    if not vllm_available():
        pytest.skip("vLLM is not installed (scripts/install_vllm.sh)")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
    from vllm import LLM

    engine = LLM(model=model_path, dtype="float32", max_model_len=512, kv_cache_memory_bytes=1 << 28,
                 enforce_eager=True, seed=0, max_num_seqs=32, additional_config={"esamp": PLUGIN_SETTINGS})
    yield engine
    del engine


@pytest.fixture(scope="session")
def runtime(llm):
    """The plugin's ESamp runtime inside this process's vLLM worker."""
    from esamp_pl.vllm import v1_runner

    bound = v1_runner.binding()
    assert bound is not None, "the plugin did not attach to vLLM's model runner"
    return bound.runtime


@pytest.fixture(scope="session")
def hf_model(model_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, local_files_only=True)
    return model.eval()
