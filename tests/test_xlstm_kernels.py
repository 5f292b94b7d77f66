"""The mLSTM cell: its chunkwise-parallel form against its one-step recurrence, and the Triton chunkwise kernel
(run on CPU under TRITON_INTERPRET=1) against the PyTorch reference.

How close is "float32 rounding" here: the cell's output divides q.C by max(|q.n|, exp(-m)); where |q.n| is small
the quotient is large and amplifies the rounding of the sums (outputs in the hundreds, relative errors ~1e-5). So
the forms are compared exactly in float64 (same function: differences at float64 rounding), and in float32
elementwise within 1e-4 * (1 + |h|), the size of each form's own float32 error against the float64 result.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the launcher imports triton

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from zoo.architectures.kernels.mlstm import (  # noqa: E402
    mlstm_chunkwise,
    mlstm_chunkwise_reference,
    mlstm_step,
    new_cell_state,
)


def cell_inputs(B, NH, S, dqk, dv, seed, dtype=torch.float32):
    """Random q, k, v and gate pre-activations in the ranges the model produces (soft-capped at 15)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    q, k, v = r(B, NH, S, dqk), r(B, NH, S, dqk), r(B, NH, S, dv)
    i = 15 * torch.tanh((3 * r(B, NH, S) - 1) / 15)
    log_f = F.logsigmoid(15 * torch.tanh((2 * r(B, NH, S) + 4) / 15))
    return [x.to(dtype) for x in (q, k, v, i, log_f)]


def start_state(B, NH, dqk, dv, seed, dtype=torch.float32):
    """A memory some tokens in (not the empty one), so the carried-in path is tested too."""
    g = torch.Generator().manual_seed(seed)
    c, n, m = new_cell_state(B, NH, dqk, dv)
    return [(x + torch.randn(x.shape, generator=g)).to(dtype) for x in (c, n, m)]


def prefix(xs, p):
    return [x[:, :, :p] for x in xs]


def stepped(xs, state):
    """The recurrence token by token: outputs [B, NH, S, dv] and a copy of the state after every token."""
    outputs, states = [], []
    for t in range(xs[0].shape[2]):
        outputs.append(mlstm_step(*[x[:, :, t] for x in xs], state))
        states.append([s.clone() for s in state])
    return torch.stack(outputs, 2), states


def close(a, b, rtol=1e-4):
    return bool(((a - b).abs() <= rtol * (1 + b.abs())).all())


@pytest.mark.parametrize("empty_start", [True, False])
def test_chunkwise_form_is_the_step_recurrence_on_every_prefix_length_float64(empty_start):
    B, NH, S, dqk, dv, L = 2, 2, 40, 8, 12, 16  # lengths 1..40: within a chunk, at 16 and 32, and ragged
    xs = cell_inputs(B, NH, S, dqk, dv, seed=0, dtype=torch.float64)
    start = (new_cell_state(B, NH, dqk, dv) if empty_start else start_state(B, NH, dqk, dv, 1))
    start = [s.double() for s in start]
    outputs, states = stepped(xs, [s.clone() for s in start])
    for p in range(1, S + 1):
        state = [s.clone() for s in start]
        h = mlstm_chunkwise_reference(*prefix(xs, p), state, chunk_size=L)
        assert torch.allclose(h, outputs[:, :, :p], rtol=1e-10, atol=1e-10), p
        assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-10) for a, b in zip(state, states[p - 1])), p


def test_chunkwise_and_step_forms_agree_to_float32_rounding_on_every_prefix_length():
    B, NH, S, dqk, dv, L = 2, 2, 70, 16, 16, 16
    xs = cell_inputs(B, NH, S, dqk, dv, seed=3)
    outputs, states = stepped(xs, new_cell_state(B, NH, dqk, dv))
    for p in range(1, S + 1):
        state = new_cell_state(B, NH, dqk, dv)
        h = mlstm_chunkwise(*prefix(xs, p), state, chunk_size=L)  # the dispatch: the reference on CPU
        assert h.dtype == torch.float32 and close(h, outputs[:, :, :p]), p
        assert all(close(a, b) for a, b in zip(state, states[p - 1])), p


def test_a_prompt_in_pieces_continues_the_memory_exactly_like_one_piece():
    xs = cell_inputs(1, 2, 50, 8, 8, seed=4, dtype=torch.float64)
    whole_state = [s.double() for s in new_cell_state(1, 2, 8, 8)]
    whole = mlstm_chunkwise_reference(*xs, whole_state, chunk_size=16)
    state = [s.double() for s in new_cell_state(1, 2, 8, 8)]
    pieces = [mlstm_chunkwise_reference(*[x[:, :, a:b] for x in xs], state, chunk_size=16)
              for a, b in ((0, 7), (7, 30), (30, 50))]
    assert torch.allclose(torch.cat(pieces, 2), whole, rtol=1e-10, atol=1e-10)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-10) for a, b in zip(state, whole_state))


def test_neutral_tokens_leave_the_memory_exactly_as_it_was():
    """Input gate -inf and log forget gate 0 (how pads are neutralised): state and later outputs unchanged."""
    xs = cell_inputs(1, 2, 20, 8, 8, seed=5)
    real = mlstm_chunkwise_reference(*xs, new_cell_state(1, 2, 8, 8), chunk_size=16)
    q, k, v, i, log_f = (torch.cat([torch.randn_like(x[:, :, :5]), x], 2) for x in xs)
    i[:, :, :5] = float("-inf")
    log_f[:, :, :5] = 0.0
    padded = mlstm_chunkwise_reference(q, k, v, i, log_f, new_cell_state(1, 2, 8, 8), chunk_size=16)
    assert torch.isfinite(padded).all()
    assert close(padded[:, :, 5:], real, rtol=1e-5)


# -- the Triton kernel under the interpreter -----------------------------------------------------------------

SHAPES = [  # B, NH, S, dqk, dv, chunk
    (2, 3, 45, 8, 16, 16),  # ragged: 2 chunks + 13, head dims below the 16-wide tiles
    (1, 2, 64, 32, 64, 16),  # whole chunks only
    (1, 1, 1, 16, 16, 16),  # one token
    (2, 2, 100, 16, 32, 32),  # ragged, bigger chunks
    (1, 2, 70, 80, 96, 64),  # head dims that are not powers of two (several tiles, masked)
]


@pytest.mark.parametrize("B,NH,S,dqk,dv,L", SHAPES)
def test_triton_chunkwise_kernel_matches_the_reference(B, NH, S, dqk, dv, L):
    from zoo.architectures.kernels.mlstm_triton import mlstm_chunkwise_triton

    xs = cell_inputs(B, NH, S, dqk, dv, seed=S)
    start = start_state(B, NH, dqk, dv, seed=1)
    ref_state, kernel_state = [s.clone() for s in start], [s.clone() for s in start]
    expected = mlstm_chunkwise_reference(*xs, ref_state, chunk_size=L)
    h = mlstm_chunkwise_triton(*xs, kernel_state, chunk_size=L)
    assert h.shape == expected.shape and h.dtype == torch.float32
    assert close(h, expected)
    for a, b in zip(kernel_state, ref_state):  # the final memory, written in place
        assert close(a, b)


def test_triton_kernel_in_bfloat16_follows_the_reference():
    from zoo.architectures.kernels.mlstm_triton import mlstm_chunkwise_triton

    xs = cell_inputs(1, 2, 40, 16, 16, seed=7)
    q, k, v = (x.bfloat16() for x in xs[:3])
    expected = mlstm_chunkwise_reference(q, k, v, *xs[3:], new_cell_state(1, 2, 16, 16), chunk_size=16)
    h = mlstm_chunkwise_triton(q, k, v, *xs[3:], new_cell_state(1, 2, 16, 16), chunk_size=16)
    assert h.dtype == torch.bfloat16
    assert close(h.float(), expected, rtol=2e-2)
