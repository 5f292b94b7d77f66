"""The oneDNN inference linear (kernels/linear.py): same numbers as F.linear (+ exact GELU) from the model's own
weight (no second copy by default); under ZOO_ONEDNN=pack a weight packed once and packed again when it changes;
the plain path wherever the oneDNN one does not apply."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.architectures.kernels import linear as lin

from tests.helpers import max_abs_diff


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
    monkeypatch.setenv("ZOO_ONEDNN", "1" if mode == "dense" else "pack")
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
    monkeypatch.setenv("ZOO_ONEDNN", "pack")
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
    monkeypatch.setenv("ZOO_ONEDNN", "0")
    with torch.no_grad():
        assert torch.equal(lin.linear(m, x), F.linear(x, m.weight, m.bias))
    assert not calls
    with pytest.raises(ValueError, match="activation"):
        lin.linear(m, x, "relu")
