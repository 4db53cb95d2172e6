"""Models say ``backend`` as the plr_kernels ops do; configs, run directories and
checkpoints written when the key was ``kernels`` still load (plr/deprecations.py)."""

import warnings

import pytest
import torch

from plr import config
from plr.errors import UserError
from plr.models import PLRModel, SequentialRecommender
from plr.training import STATE_FORMAT, check_run_dir, same_config

TINY = dict(max_len=6, hidden_size=8, num_layers=1, num_heads=2, inner_size=12, num_streams=2, num_steps=2,
            dropout=0.0)


def old_style(cfg):
    """``cfg`` as plr wrote it before the rename: ``model.kernels`` instead of ``model.backend``."""
    model = dict(cfg["model"])
    model["kernels"] = model.pop("backend")
    return {**cfg, "model": model}


def test_a_checkpoint_that_says_kernels_loads_as_backend(tmp_path):
    torch.manual_seed(0)
    model = PLRModel(20, backend="torch", **TINY).eval()
    run_cfg = config.resolve("plr", None, ["model.backend=torch"])
    model.save(str(tmp_path / "new.pt"), extra={"run_config": run_cfg})
    payload = torch.load(tmp_path / "new.pt", weights_only=True)
    payload["config"]["kernels"] = payload["config"].pop("backend")
    payload["extra"]["run_config"] = old_style(run_cfg)
    torch.save(payload, tmp_path / "old.pt")

    with pytest.warns(FutureWarning, match=r"kernels is deprecated.*backend='torch'"):
        loaded, extra = SequentialRecommender.load_with_extra(str(tmp_path / "old.pt"))
    assert isinstance(loaded, PLRModel) and loaded.backend == "torch"
    assert "kernels" not in loaded.config() and loaded.config()["backend"] == "torch"
    assert extra["run_config"]["model"]["backend"] == "torch" and "kernels" not in extra["run_config"]["model"]
    seq = torch.tensor([[0, 3, 7, 1], [5, 2, 9, 11]])
    assert torch.equal(loaded.eval()(seq).z_final, model(seq).z_final)
    # Saved again, it says backend and loads without a warning.
    loaded.save(str(tmp_path / "resaved.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SequentialRecommender.load(str(tmp_path / "resaved.pt")).backend == "torch"


def test_a_config_file_and_overrides_that_say_kernels(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  kernels: torch\n  hidden_size: 16\n")
    with pytest.warns(FutureWarning, match="model.kernels is deprecated"):
        cfg = config.resolve("plr", str(path))
    assert cfg["model"]["backend"] == "torch" and "kernels" not in cfg["model"]
    assert cfg["model"]["hidden_size"] == 16
    with pytest.warns(FutureWarning, match="model.kernels is deprecated"):
        cfg = config.resolve("sasrec", None, ["model.kernels=cpu"])
    assert cfg["model"]["backend"] == "cpu" and "kernels" not in cfg["model"]
    # A later layer's new name wins over an earlier layer's old one, as for any key.
    with pytest.warns(FutureWarning):
        cfg = config.resolve("sasrec", str(path), ["model.backend=cpu"])
    assert cfg["model"]["backend"] == "cpu"


def test_both_names_with_different_values_in_one_place_is_an_error(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("model:\n  kernels: torch\n  backend: cpu\n")
    with pytest.raises(UserError, match=r"model: both model.kernels='torch'.*model.backend='cpu'"):
        config.resolve("sasrec", str(path))
    with pytest.raises(UserError, match="unknown key"):  # a misspelt new name is still refused
        config.resolve("sasrec", None, ["model.backends=cpu"])


def test_a_run_directory_written_with_kernels_resumes(tmp_path):
    cfg = config.resolve("sasrec", None, ["model.backend=torch"], data_path=str(tmp_path))
    torch.save({"format": STATE_FORMAT, "config": old_style(cfg)}, tmp_path / "last.pt")
    with pytest.warns(FutureWarning):
        assert same_config(old_style(cfg)) == cfg
        check_run_dir(tmp_path, cfg, resume=True)  # the same settings: accepted
        other = config.resolve("sasrec", None, ["model.backend=cpu"], data_path=str(tmp_path))
        with pytest.raises(UserError, match=r"another config.*model.backend"):
            check_run_dir(tmp_path, other, resume=True)


def test_a_saved_config_predating_a_model_key_means_what_the_run_did():
    """A PLR run config written before ``rcl_view`` / ``reg_rows`` existed was
    trained with a full second view over every row: it compares equal to a
    config pinning those values, and not to today's defaults."""
    today = config.resolve("plr", None, [])
    assert (today["model"]["rcl_view"], today["model"]["reg_rows"]) == ("reasoning", "batch")
    saved = {**today, "model": {k: v for k, v in today["model"].items() if k not in ("rcl_view", "reg_rows")}}
    pinned = config.resolve("plr", None, ["model.rcl_view=full", "model.reg_rows=all"])
    assert same_config(saved) == pinned
    assert same_config(saved) != today
    assert same_config(today) == today  # a config that states the keys keeps them
