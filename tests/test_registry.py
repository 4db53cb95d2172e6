"""One registry (plr/registry.py): names -> classes for the CLI, configs and checkpoints."""

import pytest
import torch

from plr.backbones import BACKBONES, backbone_class
from plr.models import MODELS, SASRecModel, SequentialRecommender, model_class
from plr.registry import model_class_named

TINY = dict(max_len=5, hidden_size=8, num_layers=1, num_heads=2, inner_size=8, backend="torch")


def test_every_registered_name_resolves_and_checkpoints_find_their_class():
    for name, (module, cls_name) in MODELS.items():
        cls = model_class(name)
        assert issubclass(cls, SequentialRecommender) and cls.__name__ == cls_name and cls.__module__ == module
        assert model_class_named(cls_name) is cls
    for name in BACKBONES:
        assert backbone_class(name).__name__ == BACKBONES[name][1]
    assert model_class_named("NoSuchModel") is None
    with pytest.raises(ValueError, match=r"model.name: expected one of .*'plr'.*got 'plrr'"):
        model_class("plrr")
    with pytest.raises(ValueError, match=r"backbone: expected one of .*got 'gru'"):
        backbone_class("gru")


class WiderSASRec(SASRecModel):
    """A model defined outside plr (not registered)."""


def test_an_unregistered_subclass_saves_and_loads(tmp_path):
    model = WiderSASRec(12, **TINY).eval()
    model.save(str(tmp_path / "m.pt"))
    loaded = SequentialRecommender.load(str(tmp_path / "m.pt")).eval()
    assert type(loaded) is WiderSASRec
    seq = torch.tensor([[0, 1, 5, 7, 2]])
    assert torch.equal(loaded(seq).z_final, model(seq).z_final)
    with pytest.raises(TypeError, match="holds a WiderSASRec, not a PLRModel"):
        model_class("plr").load(str(tmp_path / "m.pt"))
