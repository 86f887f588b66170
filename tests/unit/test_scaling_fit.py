"""benchmarks/scaling_sweep.py's fit: on synthetic points with a known exponent (and floor) it finds them."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT


@pytest.fixture(scope="module")
def sweep():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # imported from benchmarks/, as when it runs as a script
    try:
        import scaling_sweep

        yield scaling_sweep
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_power_law_exponent_recovered(sweep):
    compute = [10.0, 30.0, 100.0, 300.0]
    fit = sweep.fit_power_law(compute, [7.0 * c**-0.3 for c in compute])
    assert fit["b"] == pytest.approx(0.3, rel=1e-9) and fit["a"] == pytest.approx(7.0, rel=1e-9)
    assert fit["floor"] == 0 and fit["rms"] < 1e-9


def test_power_law_with_a_floor_recovered(sweep):
    compute = [10.0, 30.0, 100.0, 300.0, 1000.0]
    loss = [1.5 + 4.0 * c**-0.5 for c in compute]
    plain = sweep.fit_power_law(compute, loss)
    fit = sweep.fit_power_law(compute, loss, floor=True)
    assert fit["floor"] == pytest.approx(1.5, abs=0.01) and fit["b"] == pytest.approx(0.5, abs=0.01)
    assert fit["rms"] < plain["rms"] and plain["b"] < 0.5  # without the floor the slope flattens


def test_frontier_takes_the_best_size_of_each_budget(sweep):
    points = [
        {"size": "s", "budget": 10, "bpb": 3.0},
        {"size": "m", "budget": 10, "bpb": 3.2},
        {"size": "s", "budget": 30, "bpb": 2.9},
        {"size": "m", "budget": 30, "bpb": 2.7},
    ]
    assert [(p["size"], p["budget"]) for p in sweep.frontier(points)] == [("s", 10), ("m", 30)]
    with pytest.raises(ValueError, match="two different compute"):
        sweep.fit_power_law([5.0, 5.0], [1.0, 2.0])
