"""Batched cross-attention scoring equals the per-caption reference loop (SCAN's released formulas)."""

from __future__ import annotations

import pytest
import torch

from itmatch.models.attention import i2t_scores, i2t_scores_reference, t2i_scores, t2i_scores_reference, xattn_scores
from itmatch.models.encoders import l2norm


def _inputs(I, C, R, W, d, seed, normalise=True):
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(I, R, d, generator=g, dtype=torch.float64)
    E = torch.randn(C, W, d, generator=g, dtype=torch.float64)
    if normalise:
        V, E = l2norm(V), l2norm(E)
    nreg = torch.randint(1, R + 1, (I,), generator=g)
    nreg[0] = R
    lens = torch.randint(1, W + 1, (C,), generator=g)
    lens[0] = W
    # padding rows hold garbage: results must not depend on them
    for i in range(I):
        V[i, nreg[i]:] = 7.0
    for c in range(C):
        E[c, lens[c]:] = -3.0
    return V, nreg, E, lens


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 4), (5, 7, 6, 4, 8), (9, 4, 12, 9, 16), (3, 11, 36, 13, 32)])
@pytest.mark.parametrize("agg", ["LogSumExp", "Mean", "Max", "Sum"])
def test_t2i_matches_reference(shape, agg):
    I, C, R, W, d = shape
    V, nreg, E, lens = _inputs(I, C, R, W, d, seed=sum(shape))
    hp = dict(lambda_softmax=9.0, agg=agg, lambda_lse=6.0)
    ref = t2i_scores_reference(V, nreg, E, lens, **hp)
    for max_elems in (1 << 23, 50):  # one shard, many shards
        got = t2i_scores(V.float(), nreg, E.float(), lens, max_elems=max_elems, **hp)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 4), (5, 7, 6, 4, 8), (9, 4, 12, 9, 16), (3, 11, 36, 13, 32)])
@pytest.mark.parametrize("agg", ["LogSumExp", "Mean"])
def test_i2t_matches_reference(shape, agg):
    I, C, R, W, d = shape
    V, nreg, E, lens = _inputs(I, C, R, W, d, seed=1 + sum(shape))
    hp = dict(lambda_softmax=4.0, agg=agg, lambda_lse=5.0)
    ref = i2t_scores_reference(V, nreg, E, lens, **hp)
    for max_elems in (1 << 23, 50):
        got = i2t_scores(V.float(), nreg, E.float(), lens, max_elems=max_elems, **hp)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_options_unnormalised_inputs_and_gradients():
    V, nreg, E, lens = _inputs(4, 5, 7, 6, 8, seed=0, normalise=False)
    for hp in (dict(raw_norm="none", lambda_softmax=2.0), dict(max_term=0.5), dict(agg="Mean", max_term=0.5)):
        torch.testing.assert_close(t2i_scores(V, nreg, E, lens, **hp), t2i_scores_reference(V, nreg, E, lens, **hp),
                                   rtol=1e-5, atol=1e-8)
    Vg = V.clone().requires_grad_(True)
    xattn_scores("i2t", Vg, nreg, E, lens).sum().backward()
    assert torch.isfinite(Vg.grad).all() and Vg.grad[1, nreg[1]:].abs().sum() == 0
    with pytest.raises(ValueError, match="agg must be"):
        t2i_scores(V, nreg, E, lens, agg="max")
    with pytest.raises(ValueError, match="direction"):
        xattn_scores("x", V, nreg, E, lens)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_inference_path_equals_autograd_path_and_reference(direction):
    """The in-place inference path (no autograd) and the autograd path agree with the reference: large λ₁
    (the max-shifted softmax), padding, max_term, every raw_norm; float16 / bfloat16 inputs within their
    precision."""
    V, nreg, E, lens = _inputs(6, 9, 11, 7, 16, seed=3)
    fast, ref = (t2i_scores, t2i_scores_reference) if direction == "t2i" else (i2t_scores, i2t_scores_reference)
    for hp in (dict(lambda_softmax=30.0), dict(lambda_softmax=9.0, max_term=0.5 if direction == "t2i" else 0.0),
               dict(raw_norm="none", lambda_softmax=3.0, agg="Max")):
        want = ref(V, nreg, E, lens, **hp)
        with torch.no_grad():
            torch.testing.assert_close(fast(V, nreg, E, lens, **hp), want, rtol=1e-9, atol=1e-12)
            for dtype, tol in ((torch.float16, 5e-3), (torch.bfloat16, 3e-2)):
                got = fast(V.to(dtype), nreg, E.to(dtype), lens, **hp)
                assert got.dtype == torch.float32
                torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        Vg = V.clone().requires_grad_(True)
        torch.testing.assert_close(fast(Vg, nreg, E, lens, **hp).detach(), want, rtol=1e-9, atol=1e-12)
