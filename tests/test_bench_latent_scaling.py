"""The latent_scaling benchmark's arithmetic: the marginal cost per thought fitted over n (ms, above the floor,
fraction of the floor, aten calls) and the operator counter it reads (forward and backward calls)."""
from __future__ import annotations

import pytest
import torch

from coconut_kernels.bench.bench_latent_scaling import marginal_rows, marginal_table
from coconut_kernels.bench.harness import count_aten_calls


def _row(provider, role, n, metric, value, unit="s"):
    return {"scenario": "latent_scaling_train_B8", "provider": provider, "role": role, "x_name": "thoughts",
            "x_value": n, "metric": metric, "unit": unit, "p20": value, "p50": value, "p80": value}


def test_marginal_cost_is_the_fitted_slope():
    # floor 0.5 s + 1 ms per token of n; sequential: the floor + 2 ms per thought; 100 calls per thought
    rows = []
    for n in (0, 1, 4, 16, 64):
        floor = 0.5 + 1e-3 * n
        rows += [_row("floor", "floor", n, "time", floor), _row("sequential", "impl", n, "time", floor + 2e-3 * n),
                 _row("sequential", "impl", n, "aten calls per step", 700 + 100 * n, "calls")]
    fits = {(r["provider"], r["metric"]): r["p50"] for r in marginal_rows(rows)}
    assert fits[("sequential", "marginal time per thought")] == pytest.approx(3.0)
    assert fits[("sequential", "marginal time per thought above the floor")] == pytest.approx(2.0)
    assert fits[("floor", "marginal time per thought")] == pytest.approx(1.0)
    assert fits[("sequential", "aten calls per thought")] == pytest.approx(100.0)
    # the time / floor ratio's slope: about 2 ms over a ~0.5 s pass per thought
    assert 0.003 < fits[("sequential", "marginal time per thought / floor")] < 0.004
    assert ("floor", "marginal time per thought / floor") not in fits
    assert all(r["x_value"] == "fit n>=1" for r in marginal_rows(rows))
    table = marginal_table(rows + marginal_rows(rows))
    line = next(t for t in table[1:] if t[1] == "sequential")
    assert line[2:] == ["3", "2", f"{fits[('sequential', 'marginal time per thought / floor')]:.2%}", "100", "-"]


def test_speedup_over_the_reference_trend_at_the_largest_n():
    # the reference: 2 s + 2 s per thought, measured at n <= 2; sequential 1.3 s at n = 64, 0.6 s at n = 4
    rows = [_row("reference", "reference", n, "time", 2.0 + 2.0 * n) for n in (0, 1, 2)]
    rows += [_row("sequential", "impl", 4, "time", 0.6), _row("sequential", "impl", 64, "time", 1.3),
             _row("floor", "floor", 64, "time", 0.5)]
    trend = [r for r in marginal_rows(rows) if r["metric"] == "speedup over the reference trend"]
    assert [(r["provider"], r["x_value"]) for r in trend] == [("sequential", "trend at n=64")]
    assert trend[0]["p50"] == pytest.approx(130.0 / 1.3)
    line = next(t for t in marginal_table(rows + marginal_rows(rows))[1:] if t[1] == "sequential")
    assert line[-1] == "100x at n=64"
    # one reference point is no trend; a provider measured only where the reference was is not extrapolated
    assert not [r for r in marginal_rows(rows[:1] + rows[3:]) if r["metric"] == "speedup over the reference trend"]
    near = [_row("reference", "reference", n, "time", 2.0 + 2.0 * n) for n in (0, 1, 2)] + \
        [_row("sequential", "impl", 2, "time", 0.6)]
    assert not [r for r in marginal_rows(near) if r["metric"] == "speedup over the reference trend"]


def test_the_record_renders_the_fits_under_the_times(tmp_path):
    """RESULTS.md rendered from a results.csv that holds the scenario's times and its fitted rows shows the fits'
    table (marginal_table) below the times' table, the figures as the CSV has them."""
    import csv

    from coconut_kernels.bench.__main__ import CSV_FIELDS, PROVENANCE, _load_scenarios, render_record

    _load_scenarios()
    rows = []
    for n in (0, 4, 64):
        rows += [_row("floor", "floor", n, "time", 0.5 + 1e-3 * n),
                 _row("sequential", "impl", n, "time", 0.5 + 3e-3 * n)]
    rows += marginal_rows(rows)
    (tmp_path / "results").mkdir()
    with open(tmp_path / "results" / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({**{k: "x" for k in PROVENANCE}, **r})
    text = render_record(tmp_path / "RESULTS.md")
    assert "ms / thought above floor" in text and text.index("ms / thought") > text.index("thoughts=64")
    line = next(ln for ln in text.splitlines() if ln.startswith("latent_scaling_train_B8  sequential"))
    assert line.split()[2:4] == ["3", "2"]


def test_aten_calls_count_the_backward_too():
    x = torch.randn(4, requires_grad=True)
    fwd = count_aten_calls(lambda: x.sin().sum())
    both = count_aten_calls(lambda: x.sin().sum().backward())
    assert fwd["aten.sin"] == 1 and "aten.cos" not in fwd
    assert both["aten.cos"] == 1 and sum(both.values()) > sum(fwd.values())
