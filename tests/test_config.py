"""Config resolution: shipped YAML <- user YAML <- --set overrides."""

import pytest
import yaml

from plr import config


def test_resolution_order_and_defaults(tmp_path):
    user = tmp_path / "cfg.yaml"
    user.write_text(yaml.safe_dump({"model": {"num_streams": 4}, "train": {"lr": 0.01, "epochs": 3}}))
    cfg = config.resolve("plr", str(user), ["train.lr=0.002", "model.kl_objective=consistency"], "data/x")
    assert cfg["model"]["name"] == "plr" and cfg["model"]["num_streams"] == 4
    assert cfg["model"]["num_steps"] == 2  # shipped default kept
    assert cfg["train"]["lr"] == 0.002 and cfg["train"]["epochs"] == 3
    assert cfg["model"]["kl_objective"] == "consistency"
    assert cfg["data"]["path"] == "data/x" and cfg["data"]["max_len"] == 50
    assert cfg["eval"]["ks"] == [5, 10, 20, 50] and cfg["eval"]["exclude_history"] is False
    saved = tmp_path / "resolved.yaml"
    config.save(cfg, saved)
    assert config.check(config.load_yaml(saved)) == cfg


def test_shipped_configs_follow_the_rearec_defaults():
    for name in ("sasrec", "plr"):
        m = config.shipped_config(name)["model"]
        assert (m["hidden_size"], m["num_layers"], m["num_heads"], m["inner_size"], m["dropout"]) == (256, 2, 2, 300, 0.5)
        assert m["temperature"] == 0.07


@pytest.mark.parametrize("model,overrides,match", [
    ("nope", [], r"model: expected one of \[.*'plr'.*'sasrec'.*\], got 'nope'"),
    ("plr", ["train.lrr=1"], r"unknown key\(s\) \['lrr'\] in section 'train'"),
    ("plr", ["optim.lr=1"], r"unknown section\(s\) \['optim'\]"),
    ("plr", ["lr=1"], r"--set: expected a key of the form section.key"),
    ("plr", ["train.lr"], r"--set: expected section.key=value"),
])
def test_bad_configs_say_what_is_wrong(model, overrides, match):
    with pytest.raises(ValueError, match=match):
        config.resolve(model, None, overrides)
