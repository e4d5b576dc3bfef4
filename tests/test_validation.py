"""Bad input gives a clear ValueError / TypeError that names the problem."""

from __future__ import annotations

import pytest
import torch

import diffdensity as dd
from conftest import F64, gen, make_mixture


@pytest.fixture
def gmm():
    return make_mixture(dd.VP(), 4, k=2, seed=0)


@pytest.fixture
def x(gmm):
    return gmm.sample(3, generator=gen(1))


def test_mismatched_event_shapes(gmm, x):
    with pytest.raises(ValueError, match=r"event shape \(5,\), but the model expects \(4,\)"):
        dd.log_likelihood(gmm, torch.zeros(3, 5, dtype=F64), steps=2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, \*\(4,\)\)"):
        gmm.log_prob(torch.zeros(3, 2, 2, dtype=F64), 0.5)
    with pytest.raises(ValueError, match=r"x must have shape"):
        gmm.score(torch.zeros(3, 5, dtype=F64), 0.5)
    model = dd.ScoreModel(lambda z, t: -z, dd.VP(), event_shape=(2, 2))
    with pytest.raises(ValueError, match=r"event shape \(4,\), but the model expects \(2, 2\)"):
        dd.log_likelihood(model, x, steps=2)
    with pytest.raises(ValueError, match=r"shape \(B, \*event_shape\) with B >= 1"):
        dd.log_likelihood(gmm, torch.zeros(4, dtype=F64), steps=2)
    with pytest.raises(ValueError, match=r"B >= 1"):
        dd.log_likelihood(gmm, torch.zeros(0, 4, dtype=F64), steps=2)
    with pytest.raises(ValueError, match=r"t must be a scalar or of shape \(3,\)"):
        gmm.log_prob(x, torch.full((2,), 0.5, dtype=F64))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_x(gmm, x, value):
    bad = x.clone()
    bad[2, 1] = value
    with pytest.raises(ValueError, match=r"x contains NaN or Inf in 1 of 3 samples \(first: index 2\)"):
        dd.log_likelihood(gmm, bad, steps=2)


def test_x_type(gmm, x):
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        dd.log_likelihood(gmm, x.tolist(), steps=2)
    with pytest.raises(TypeError, match="floating-point"):
        dd.log_likelihood(gmm, torch.zeros(3, 4, dtype=torch.int64), steps=2)


def test_model_type(x):
    with pytest.raises(TypeError, match=r"model must provide \.score"):
        dd.log_likelihood(lambda z, t: z, x, steps=2)


def test_t_outside_range(gmm):
    with pytest.raises(ValueError, match=r"t must lie in \[t_min, t_max\] = \[0, 1\]"):
        gmm.sample_t(3, 1.5, generator=gen(2))
    with pytest.raises(ValueError, match=r"t must lie in \[t_min, t_max\]"):
        gmm.sample_t(2, torch.tensor([0.5, -0.1], dtype=F64), generator=gen(2))
    with pytest.raises(ValueError, match=r"t must be a scalar or of shape \(3,\)"):
        gmm.sample_t(3, torch.tensor([0.5, 0.2], dtype=F64), generator=gen(2))
    edm = dd.EDM()
    with pytest.raises(ValueError, match=r"t must lie in \[t_min, t_max\] = \[0.002, 80\]"):
        edm.check_t(0.0)
    with pytest.raises(ValueError, match="grid end points"):
        edm.time_grid(4, t_end=100.0)
    with pytest.raises(ValueError, match="finite"):
        edm.check_t(float("nan"))


def test_unknown_options(gmm, x):
    with pytest.raises(ValueError, match=r"unknown parametrization 'epsilon'; expected one of"):
        dd.ScoreModel(lambda z, t: z, dd.VP(), parametrization="epsilon")
    with pytest.raises(ValueError, match=r"unknown solver 'rk45'; expected one of"):
        dd.log_likelihood(gmm, x, solver="rk45")
    with pytest.raises(ValueError, match=r"unknown grid 'linear'; expected one of"):
        dd.log_likelihood(gmm, x, grid="linear")
    with pytest.raises(ValueError, match=r"unknown divergence 'trace'"):
        dd.log_likelihood(gmm, x, divergence="trace")
    with pytest.raises(ValueError, match=r"unknown spacing 'cosine'"):
        dd.VP().time_grid(4, spacing="cosine")
    with pytest.raises(ValueError, match=r"unknown noise 'uniform'"):
        dd.Hutchinson(noise="uniform")
    with pytest.raises(ValueError, match=r"unknown resample 'sample'"):
        dd.Hutchinson(resample="sample")
    with pytest.raises(ValueError, match=r"unknown mode 'backward'"):
        dd.Exact(mode="backward")
    with pytest.raises(TypeError, match="unexpected keyword argument 'prob'"):
        dd.log_likelihood(gmm, x, prob=4)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "8"])
def test_bad_steps(gmm, x, steps):
    with pytest.raises(ValueError, match=f"steps must be a positive integer, got {steps!r}"):
        dd.log_likelihood(gmm, x, steps=steps)


@pytest.mark.parametrize("probes", [0, -1, 1.0])
def test_bad_probes(gmm, x, probes):
    with pytest.raises(ValueError, match=f"probes must be a positive integer, got {probes!r}"):
        dd.log_likelihood(gmm, x, probes=probes)
    with pytest.raises(ValueError, match="probes must be a positive integer"):
        dd.Hutchinson(probes)


def test_model_kwargs_must_be_a_dict(gmm, x):
    with pytest.raises(TypeError, match="model_kwargs must be a dict, got list"):
        dd.log_likelihood(gmm, x, steps=2, model_kwargs=[("label", 1)])


def test_conditioning_reaches_the_model_and_unknown_conditioning_raises(gmm, x):
    with pytest.raises(TypeError, match="GaussianMixture takes no conditioning, got \\['label'\\]"):
        dd.log_likelihood(gmm, x, steps=2, divergence="exact", model_kwargs={"label": 1})
    seen = []

    def fn(z, t, *, label):
        seen.append(label)
        return gmm.score(z, t)

    dd.log_likelihood(dd.ScoreModel(fn, gmm.schedule), x, steps=2, divergence="exact", model_kwargs={"label": 7})
    assert seen and set(seen) == {7}


def test_prior_logp_must_return_one_value_per_sample(gmm, x):
    with pytest.raises(ValueError, match=r"prior_logp must return one log-density per sample, shape \(3,\); got \(3, 4\)"):
        dd.log_likelihood(gmm, x, steps=2, divergence="exact", prior_logp=lambda z: -0.5 * z**2)


def test_mixture_arguments():
    with pytest.raises(ValueError, match="stds must be positive"):
        dd.GaussianMixture(torch.zeros(2, 3), torch.tensor([1.0, -1.0]), schedule=dd.VP())
    with pytest.raises(ValueError, match="rotation is not orthogonal"):
        dd.GaussianMixture(torch.zeros(2, 3), 1.0, schedule=dd.VP(), rotation=torch.ones(3, 3))
