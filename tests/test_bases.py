"""Probe bases (docs/math.md s.6): orthonormal, unbiased, and exact where they diagonalise J."""

from __future__ import annotations

import math

import pytest
import torch

import diffdensity as dd
from conftest import F64, gen, make_mixture
from diffdensity.bases import ImageDCT, Pixel, resolve_basis
from diffdensity.divergence import model_fn

SHAPE = (3, 8, 8)


def basis_matrix(basis, shape) -> torch.Tensor:
    """``Q`` ``(D, D)`` whose columns are the basis vectors (``synthesis`` of unit coefficients)."""
    d = math.prod(shape)
    return basis.synthesis(torch.eye(d, dtype=F64).reshape(d, *shape)).reshape(d, d).T


@pytest.mark.parametrize("shape", [(3, 8, 6), (1, 8, 8), (8, 4), (2, 3, 4, 4)])
def test_image_dct_is_orthonormal_and_analysis_is_its_transpose(shape):
    basis = ImageDCT(shape)
    q = basis_matrix(basis, shape)
    torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0], dtype=F64), rtol=0, atol=1e-12)
    v = torch.randn(5, *shape, generator=gen(1), dtype=F64)
    torch.testing.assert_close(basis.analysis(v).reshape(5, -1), v.reshape(5, -1) @ q, rtol=0, atol=1e-12)
    torch.testing.assert_close(basis.synthesis(basis.analysis(v)), v, rtol=0, atol=1e-12)


def test_three_channels_get_the_opponent_colours():
    """A grey constant image is one coefficient (luminance, frequency 0); a constant red-blue
    difference another; pixels of one channel are spread over channels."""
    grey = torch.ones(1, *SHAPE, dtype=F64)
    c = ImageDCT(SHAPE).analysis(grey)
    assert c[0, 0, 0, 0] == pytest.approx(math.sqrt(grey.numel()), rel=1e-12)
    assert float(c.abs().sum() - c[0, 0, 0, 0].abs()) < 1e-10
    rb = torch.stack([torch.ones(8, 8), torch.zeros(8, 8), -torch.ones(8, 8)]).to(F64)[None]
    c = ImageDCT(SHAPE).analysis(rb)
    assert c[0, 1, 0, 0] == pytest.approx(math.sqrt(2 * 64), rel=1e-12)
    assert float(c.abs().sum() - c[0, 1, 0, 0].abs()) < 1e-10
    assert not ImageDCT((4, 8, 8)).colour


def test_resolve_basis_choices_and_errors():
    assert isinstance(resolve_basis("auto", (3, 16, 16)), ImageDCT)
    assert isinstance(resolve_basis("auto", (16, 16)), ImageDCT)
    for shape in [(768,), (3, 2, 2), (2, 3, 8, 8)]:
        assert isinstance(resolve_basis("auto", shape), Pixel), shape
    assert isinstance(resolve_basis("pixel", SHAPE), Pixel)
    custom = ImageDCT(SHAPE)
    assert resolve_basis(custom, SHAPE) is custom
    with pytest.raises(ValueError, match="unknown probe basis"):
        dd.Hutchinson(1, basis="wavelet")
    with pytest.raises(TypeError, match="synthesis"):
        dd.Hutchinson(1, basis=object())
    with pytest.raises(ValueError, match="image-shaped"):
        resolve_basis("dct", (64,))


def linear_field(a: torch.Tensor, shape):
    """``x -> A x`` on batches ``(B, *shape)``: Jacobian ``A`` everywhere."""
    return lambda x: (x.reshape(x.shape[0], -1) @ a.T).reshape(x.shape[0], *shape)


def offdiagonal_variance(jac: torch.Tensor, q: torch.Tensor) -> float:
    """Rademacher variance per probe in the basis ``Q``: ``2 sum_{i != j} S'_ij^2``."""
    s = q.T @ ((jac + jac.T) / 2) @ q
    return float(2 * (s.square().sum() - torch.diagonal(s).square().sum()))


def test_a_jacobian_diagonal_in_the_basis_is_estimated_exactly():
    d = math.prod(SHAPE)
    q = basis_matrix(ImageDCT(SHAPE), SHAPE)
    lam = torch.empty(d, dtype=F64).uniform_(-3, 1, generator=gen(2))
    a = q @ torch.diag(lam) @ q.T  # dense in pixels (a blur with colour mixing), diagonal in the DCT
    x = torch.randn(4, *SHAPE, generator=gen(3), dtype=F64)
    for basis in ("auto", "dct"):
        est = dd.Hutchinson(2, mode="forward", basis=basis)
        est.reset(gen(4))
        _, div = est(linear_field(a, SHAPE), x)
        torch.testing.assert_close(div, torch.full((4,), float(lam.sum()), dtype=F64), rtol=1e-12, atol=1e-10)
        assert float(est.last_var.max()) < 1e-12 * float(lam.square().sum())
    pixel = dd.Hutchinson(2, mode="forward", basis="pixel")
    pixel.reset(gen(4))
    _, div = pixel(linear_field(a, SHAPE), x)
    var = offdiagonal_variance(a, torch.eye(d, dtype=F64))
    assert var > 1.0
    assert float((div - lam.sum()).abs().max()) > 0.1 * math.sqrt(var / 2)  # pixels are not exact
    torch.testing.assert_close(pixel.last_var, torch.full((4,), var / 2, dtype=F64), rtol=0.25, atol=0)


def test_probes_in_the_basis_are_unbiased_with_the_stated_variance():
    """A dense symmetric J, not diagonal in the DCT: 4000 one-probe estimates average to tr J
    within 4 standard errors, spread as ``2 sum_{i != j} S'_ij^2`` in that basis, and the
    one-probe variance estimate (chained over calls) matches that on average."""
    d, n = math.prod(SHAPE), 4000
    q = basis_matrix(ImageDCT(SHAPE), SHAPE)
    g = torch.randn(d, d, generator=gen(5), dtype=F64) / math.sqrt(d)
    a = (g + g.T) / 2 + torch.diag(torch.linspace(-2, 0, d, dtype=F64))
    var = offdiagonal_variance(a, q)
    x = torch.randn(n, *SHAPE, generator=gen(6), dtype=F64)
    est = dd.Hutchinson(1, mode="forward", basis="dct")
    est.reset(gen(7))
    field = linear_field(a, SHAPE)
    est(field, x)  # the first call: two probes; the next calls: one, chained
    _, draws = est(field, x)
    z = (draws.mean() - torch.trace(a)) / math.sqrt(var / n)
    assert abs(float(z)) < 4, float(z)
    assert abs(float(draws.var()) / var - 1) < 0.2, float(draws.var()) / var
    assert abs(float(est.last_var.mean()) / var - 1) < 0.05, float(est.last_var.mean()) / var


def test_tracking_in_the_basis_is_exact_for_a_gaussian_diagonal_in_it():
    """PF-ODE tracking on an image-shaped Gaussian whose covariance the DCT diagonalises: probes
    in the DCT basis (the default for images) equal the exact divergence; with two probes per
    call the stated error is zero, with one (chained over calls, docs/math.md s.9) it errs on
    the safe side, by the change of the spectrum between calls; in pixels the same probes are
    noisy and say so."""
    d = math.prod(SHAPE)
    q = basis_matrix(ImageDCT(SHAPE), SHAPE)
    gauss = make_mixture(dd.VP(), d, k=1, seed=8, rotate=False, event_shape=SHAPE, rotation=q)
    x_T = gauss.schedule.prior_sample((3, *SHAPE), generator=gen(9), dtype=F64)
    run = lambda div: dd.sample(gauss, x_T=x_T, steps=32, divergence=div, generator=gen(10))  # noqa: E731
    exact = run("exact")
    for probes in (1, 2):
        dct, pixel = run(dd.Hutchinson(probes)), run(dd.Hutchinson(probes, basis="pixel"))
        torch.testing.assert_close(dct.logp, exact.logp, rtol=0, atol=1e-8)
        assert float((pixel.logp - exact.logp).abs().max()) > 0.1
        assert float(pixel.logp_stderr.min()) > 1.0
        assert float(dct.logp_stderr.max()) < (1e-5 if probes == 2 else 0.2 * float(pixel.logp_stderr.min()))


def test_half_precision_probes_are_transformed_in_float32():
    """Probes for a float16 / bfloat16 network come back in its dtype; the analysis of its
    products is done in float32, so the rounding of a half-precision transform does not
    enter the estimate."""
    basis = ImageDCT(SHAPE)
    r = torch.randint(0, 2, (2, *SHAPE), generator=gen(11)).to(torch.bfloat16) * 2 - 1
    e = basis.synthesis(r)
    assert e.dtype == torch.bfloat16
    exact = basis.synthesis(r.to(F64))
    assert float((e.to(F64) - exact).abs().max()) < 1e-2 * float(exact.abs().max())
    assert basis.analysis(e).dtype == torch.float32
    est = dd.Hutchinson(1)
    assert isinstance(est.basis_for(torch.zeros(1, *SHAPE, dtype=torch.bfloat16)), Pixel)  # auto: +-1 probes are exact
    assert isinstance(est.basis_for(torch.zeros(1, *SHAPE)), ImageDCT)
