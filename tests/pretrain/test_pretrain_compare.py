"""The init comparison runs the real engine for each init on identical tokens (beta = 0)."""

from pathlib import Path

from hydra import compose, initialize_config_dir

from esamp_pl.pretrain.compare import compare_inits, mean_over_first

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_compare_inits_on_a_tiny_model(tiny_model_dir, cache_env):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model.name=tiny", f"model.name_or_path={tiny_model_dir}", "model.gguf_file=null", "model.package=null",
            "model.sha256=null", "model.chat_template=false", "prompts=[hello there, a second prompt]", "n=2",
            "max_new_tokens=6", "esamp.beta=0", "distiller.rank=8", "sampling.min_p=0.0"])
    report = compare_inits(cfg, inits=("random", "svd"), windows=(2, 128))
    rows = report["inits"]
    assert set(rows) == {"random", "svd"} and rows["random"]["steps"] == rows["svd"]["steps"] > 0
    for row in rows.values():
        assert row["updates"] > 0 and row["relative_error_first_2"] > 0
        assert row["relative_error_first_128"] == mean_over_first(row["relative_error_per_step"], 128)
    assert rows["random"]["relative_error_per_step"] != rows["svd"]["relative_error_per_step"]
