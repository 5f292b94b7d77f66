"""The oneDNN inference linear (kernels/linear.py): same numbers as F.linear (+ exact GELU) from the model's own
weight (no second copy by default); in the "pack" mode a weight packed once and packed again when it changes;
the plain path wherever the oneDNN one does not apply; the mode from ZOO_ONEDNN (read once, zoo.settings) or a
model's own (zoo.load(onednn=...), zoo predict --onednn)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.architectures.kernels import linear as lin

import zoo
from tests.helpers import max_abs_diff, tiny_qwen2
from zoo import settings


def layer(i=96, o=40, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(i, o)


@pytest.fixture
def calls(monkeypatch):
    """Counts the oneDNN calls, to prove the fast path ran."""
    seen = []
    real = torch.ops.mkldnn._linear_pointwise

    def counting(*args):
        seen.append(args[1])
        return real(*args)
    monkeypatch.setattr(lin, "_pointwise", counting)
    return seen


@pytest.mark.parametrize("mode", ["dense", "pack"])
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 33, 96)])
def test_onednn_path_matches_f_linear_with_and_without_gelu_and_bias(shape, mode, calls, monkeypatch):
    monkeypatch.setattr(settings.SETTINGS, "onednn", mode)
    m, x = layer(), torch.randn(*shape)
    with torch.inference_mode():
        assert max_abs_diff(lin.linear(m, x), F.linear(x, m.weight, m.bias)) < 1e-5
        assert max_abs_diff(lin.linear(m, x, "gelu"), F.gelu(F.linear(x, m.weight, m.bias))) < 1e-5
        other = torch.randn(40)
        assert max_abs_diff(lin.linear(m, x, bias=other), F.linear(x, m.weight, other)) < 1e-5
        assert max_abs_diff(lin.linear(m, x, bias=None), F.linear(x, m.weight)) < 1e-5
        strided = torch.randn(96, shape[0]).t()  # a transposed view as input
        assert max_abs_diff(lin.linear(m, strided), F.linear(strided, m.weight, m.bias)) < 1e-5
    assert len(calls) == 5  # the fast path ran
    if mode == "dense":  # the default holds no second copy of the weight
        assert lin._PACKED not in m.__dict__ and all(w is m.weight for w in calls)
    else:
        assert lin._PACKED in m.__dict__ and all(w.is_mkldnn for w in calls)


def test_a_changed_or_reloaded_weight_is_packed_again(monkeypatch):
    monkeypatch.setattr(settings.SETTINGS, "onednn", "pack")
    m, x = layer(), torch.randn(3, 96)
    with torch.no_grad():
        lin.linear(m, x)
        first = m.__dict__[lin._PACKED][1]
        lin.linear(m, x)
        assert m.__dict__[lin._PACKED][1] is first  # cached
        m.load_state_dict(layer(seed=1).state_dict())  # copies in place: same storage, new version
        assert max_abs_diff(lin.linear(m, x), F.linear(x, m.weight, m.bias)) < 1e-5
        assert m.__dict__[lin._PACKED][1] is not first
        m.weight = nn.Parameter(torch.randn(40, 96))  # a new tensor
        assert max_abs_diff(lin.linear(m, x), F.linear(x, m.weight, m.bias)) < 1e-5
    assert "weight" in m.state_dict() and lin._PACKED not in m.state_dict()


def test_plain_path_under_autograd_other_dtypes_or_switched_off(monkeypatch, calls):
    m, x = layer(), torch.randn(3, 96, requires_grad=True)
    y = lin.linear(m, x, "gelu")
    y.sum().backward()  # differentiable: the plain path
    assert x.grad is not None and not calls
    mb = layer().to(torch.bfloat16)
    with torch.no_grad():
        xb = torch.randn(3, 96, dtype=torch.bfloat16)
        assert torch.equal(lin.linear(mb, xb), F.linear(xb, mb.weight, mb.bias))
    monkeypatch.setattr(settings.SETTINGS, "onednn", "off")
    with torch.no_grad():
        assert torch.equal(lin.linear(m, x), F.linear(x, m.weight, m.bias))
    assert not calls
    with pytest.raises(ValueError, match="activation"):
        lin.linear(m, x, "relu")


@pytest.mark.parametrize("text,mode", [("1", "dense"), ("", "dense"), ("pack", "pack"), (" PACK ", "pack"),
                                       ("0", "off"), ("off", "off"), ("no", "off")])
def test_zoo_onednn_is_read_into_the_settings(text, mode):
    assert settings.from_environ({"ZOO_ONEDNN": text}).onednn == mode
    assert settings.from_environ({}).onednn == "dense"


def test_a_models_own_mode_wins_over_the_process_setting(monkeypatch, calls):
    monkeypatch.setattr(settings.SETTINGS, "onednn", "pack")
    model = nn.Sequential(layer(), nn.GELU())
    lin.set_onednn(model, "off")
    x = torch.randn(3, 96)
    with torch.no_grad():
        assert torch.equal(lin.linear(model[0], x), F.linear(x, model[0].weight, model[0].bias))
        assert not calls and lin._PACKED not in model[0].__dict__
        lin.set_onednn(model, "dense")
        assert max_abs_diff(lin.linear(model[0], x), F.linear(x, model[0].weight, model[0].bias)) < 1e-5
        assert calls == [model[0].weight]  # its own weight, no packed copy, though the process says "pack"
    with pytest.raises(ValueError, match="onednn='fast'"):
        lin.set_onednn(model, "fast")


def test_load_and_the_cli_take_the_onednn_mode(tmp_path):
    tiny_qwen2(tmp_path / "hf")
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native", onednn="pack")
    modes = {sub.__dict__.get(lin._MODE) for sub in model.module.modules() if isinstance(sub, nn.Linear)}
    assert modes == {"pack"}
    assert all(lin._MODE not in sub.__dict__ for sub in zoo.load(tmp_path / "native").module.modules())
    with pytest.raises(ValueError, match="onednn='fast'"):
        zoo.load(tmp_path / "native", onednn="fast")
    from zoo.cli import _parser

    assert _parser().parse_args(["predict", "m", "cat.jpg", "--onednn", "off"]).onednn == "off"
    assert _parser().parse_args(["predict", "m", "cat.jpg"]).onednn is None
