"""The one atomic-write helper, JSON without NaN, the run-folder lock, and the import rules around them."""

import math
from pathlib import Path

import pytest

import esamp_pl
from esamp_pl.errors import SetupError
from esamp_pl.files import (atomic_dir, atomic_path, dumps_json, exclusive_lock, finite_or_none, write_json_atomic,
                            write_text_atomic)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    with pytest.raises(ValueError):
        write_json_atomic(path, {"loss": math.nan})
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_json_has_no_nan_and_non_finite_numbers_become_null():
    assert [finite_or_none(v, 2) for v in (1.234, math.nan, math.inf, None)] == [1.23, None, None, None]
    assert dumps_json({"t": "café"}) == '{"t": "café"}'
    with pytest.raises(ValueError):
        dumps_json([math.inf])


def test_atomic_dir_renames_only_a_complete_folder(tmp_path):
    dest = tmp_path / "cache"
    with pytest.raises(RuntimeError), atomic_dir(dest, is_complete=lambda f: (f / "done").is_file()) as tmp:
        (tmp / "part").write_text("x")
        raise RuntimeError("interrupted")
    assert not dest.exists() and not list(tmp_path.iterdir())
    with atomic_dir(dest, is_complete=lambda f: (f / "done").is_file()) as tmp:
        (tmp / "done").write_text("ok")
    assert (dest / "done").read_text() == "ok"


def test_a_held_lock_refuses_a_second_holder_and_is_released(tmp_path):
    lock = tmp_path / "run" / ".lock"
    with exclusive_lock(lock, "the run folder"):
        with pytest.raises(SetupError, match="the run folder is in use by another run"):
            with exclusive_lock(lock, "the run folder"):
                pass
    with exclusive_lock(lock, "the run folder"):
        pass


def test_pretraining_does_not_import_the_generate_script_module():
    root = Path(esamp_pl.__file__).parent / "pretrain"
    assert [p.name for p in root.glob("*.py") if "esamp_pl.generation" in p.read_text()] == []
