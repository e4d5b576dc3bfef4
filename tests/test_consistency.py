"""The consistency check: tracked log-density against re-encoding the same samples."""

import pytest
import torch

import diffdensity as dd
from diffdensity.consistency import ConsistencyReport, check_consistency
from diffdensity.divergence import Exact
from conftest import gen, make_mixture

F64 = torch.float64


@pytest.fixture(scope="module")
def gmm():
    return make_mixture(dd.VP(), 8, 3, seed=2)


def test_gap_is_small_on_an_exact_mixture_and_reports_its_parts(gmm):
    """Exact score, exact divergence, Heun: both estimates are accurate, the gap is the discretisation's (< 0.05 nats)."""
    r = dd.sample(gmm, 5, steps=64, divergence=Exact(), generator=gen(0), dtype=F64)
    rep = check_consistency(gmm, r, n=3, steps=64, divergence=Exact())
    assert isinstance(rep, ConsistencyReport)
    assert rep.index.tolist() == [0, 1, 2] and rep.gap.shape == (3,) and rep.gap.dtype == F64
    exact = gmm.log_prob(r.x[:3], gmm.schedule.t_min)
    assert (rep.reencoded - exact).abs().max() < 0.05
    assert torch.allclose(rep.gap, rep.tracked - rep.reencoded)
    assert rep.max_abs_gap < 0.05 and rep.median_abs_gap <= rep.max_abs_gap
    assert rep.gap_stderr.shape == (3,) and (rep.gap_stderr >= 0).all()
    lines = rep.lines()
    assert len(lines) == 4 and "median |gap|" in lines[-1]


def test_gap_stderr_combines_both_estimates(gmm):
    """With Hutchinson re-encoding (4 probes) the gap is within a few of its stated standard errors."""
    r = dd.sample(gmm, 4, steps=64, divergence=Exact(), generator=gen(1), dtype=F64)
    rep = check_consistency(gmm, r, steps=64, probes=4, generator=gen(2))
    assert rep.reencoded_stderr is not None and (rep.reencoded_stderr > 0).all()  # the likelihood result states its error
    assert (rep.gap_stderr >= rep.reencoded_stderr).all()
    assert rep.within(5.0).all(), (rep.gap, rep.gap_stderr)
    assert rep.max_abs_gap < 2.0


def test_bad_input(gmm):
    r = dd.sample(gmm, 2, steps=4, generator=gen(0), dtype=F64)
    with pytest.raises(ValueError, match="n=3 exceeds"):
        check_consistency(gmm, r, n=3, steps=4)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        check_consistency(gmm, r, n=0, steps=4)
    plain = dd.sample(gmm, 2, steps=4, generator=gen(0), dtype=F64, track_logp=False)
    with pytest.raises(ValueError, match="track_logp=True"):
        check_consistency(gmm, plain, steps=4)
