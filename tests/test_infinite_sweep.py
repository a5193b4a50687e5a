"""Sweep points against the infinite-width limit (ntkdyn.experiments.infinite_gaps), its records and report.

Oracles, float64. A comparison is stood in for by what ``compare`` stores of the closed form — the spectrum
of the full empirical NTK (the library's flatten and eigendecomposition, as its solver does) and Eq. 9/10 at
the recorded steps — so no training program is compiled here (``tests/test_sweep.py`` runs the real thing end
to end). For a linear-activation MLP of depth 2 the limit is written by hand (``K ← σ_w² K + σ_b²``,
``Θ ← K + σ_w² Θ``): the kernel error is checked against ``ntkdyn.kernels.empirical_ntk``, the gap curves
against NumPy matrix powers of both kernels, and a network whose kernel *is* the limit has no kernel error
and no eNTK-vs-∞ gap. The report is rendered from fabricated records with known power laws.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_results_folder import GRID, fake_record, line

from ntkdyn import models
from ntkdyn.kernels.layout import flatten_kernel
from ntkdyn.spectral import spectrum
from ntkdyn.experiments import report as report_module
from ntkdyn.experiments import sweep as sweep_module
from ntkdyn.experiments.families import ResidualMLP
from ntkdyn.experiments.infinite_gaps import INFINITE_METRICS, infinite_gaps
from ntkdyn.experiments.report import infinite_rows, infinite_text, slope_table, write_report
from ntkdyn.experiments.sweep import RECORD_VERSION, RESULTS_FILE, SweepGrid, sweep
from ntkdyn.kernels import empirical_ntk

N, NT, D, K = 3, 2, 3, 2
SIGMA_W, SIGMA_B = 1.5, 0.05
RECORDS = np.array([0, 1, 3, 6])
OFFSET = 0.01  # the stand-in "real" outputs: the eNTK prediction shifted by this after step 0


def _data():
    ks = jax.random.split(jax.random.key(3), 4)
    return tuple(jax.random.normal(k, shape) for k, shape in zip(ks, ((N, D), (N, K), (NT, D), (NT, K))))


def _linear_limit(x1, x2, depth):
    """(NNGP, NTK) of a linear-activation NTK-parameterized MLP by hand: A = K, Ȧ = 1 at every layer."""
    k = SIGMA_W**2 * np.asarray(x1) @ np.asarray(x2).T / D + SIGMA_B**2
    theta = k
    for _ in range(depth):
        k = SIGMA_W**2 * k + SIGMA_B**2
        theta = k + SIGMA_W**2 * theta
    return k, theta


def _flat(k):
    n1, n2, k1, k2 = k.shape
    return k.transpose(0, 2, 1, 3).reshape(n1 * k1, n2 * k2)


def _gd(theta, theta_st, y, f0, f0_test, lr, t):
    """Eq. 9/10 in discrete time with full (N·K)² kernels, by matrix powers: (train (N, K), test (NT, K))."""
    n = theta.shape[0]
    decay = np.linalg.matrix_power(np.eye(n) - lr * theta / n, int(t))
    r0 = (f0 - y).reshape(-1)
    train = y.reshape(-1) + decay @ r0
    test = f0_test.reshape(-1) - theta_st @ np.linalg.solve(theta, (np.eye(n) - decay) @ r0)
    return train.reshape(-1, K), test.reshape(-1, K)


def _stand_in(k_tt, k_st, y, f0, f0t, lr, *, momentum=0.0, closed_form=True, optimizer="sgd"):
    """What a Comparison holds of the closed form: the spectrum of the full kernel (the library's own flatten and
    eigendecomposition, as compare's solve does), Eq. 9/10 at RECORDS (by matrix powers), the real outputs."""
    spec = spectrum(flatten_kernel(jnp.asarray(k_tt)))
    lin = [_gd(_flat(k_tt), _flat(k_st), y, f0, f0t, lr, t) for t in RECORDS]
    shift = OFFSET * (RECORDS > 0)[:, None, None]  # real[0] is f(θ₀), as in a comparison
    train, test = np.stack([a for a, _ in lin]), np.stack([b for _, b in lin])
    return SimpleNamespace(
        spectrum=spec, steps=RECORDS, learning_rate=lr, momentum=momentum, time="discrete", closed_form=closed_form,
        optimizer=optimizer, objective="mse", train=SimpleNamespace(lin=train, real=train + shift),
        test=SimpleNamespace(lin=test, real=test + shift),
    )


@pytest.fixture(scope="module")
def deep():
    """A linear-activation MLP of depth 2, width 8: (model, params, stand-in, data, Θ_emp on X ∪ X*, gaps)."""
    x, y, xt, yt = _data()
    module = models.MLP(D, K, width=8, depth=2, activation="linear", sigma_w=SIGMA_W, sigma_b=SIGMA_B,
                        rngs=nnx.Rngs(1))
    model, params = models.as_apply_fn(module)
    k_all = np.asarray(empirical_ntk(model, params, jnp.concatenate([x, xt]), trace_outputs=False,
                                     method="jacobian"))
    f0, f0t = np.asarray(model(params, x)), np.asarray(model(params, xt))
    lr = 0.4 * 2 * N * K / np.linalg.eigvalsh(_flat(k_all[:N, :N]))[-1]  # 0.4 of the stability limit
    comp = _stand_in(k_all[:N, :N], k_all[N:, :N], np.asarray(y), f0, f0t, lr)
    return model, params, comp, (x, y, xt, yt), k_all, infinite_gaps(comp, model, params, x, y, x_test=xt, y_test=yt)


def test_kernel_error_equals_empirical_ntk_against_the_hand_written_limit(deep):
    model, params, comp, (x, y, xt, yt), k_all, gaps = deep
    emp = k_all[:N, :N]
    _, theta_inf = _linear_limit(x, x, depth=2)
    expected = np.linalg.norm(emp - theta_inf[:, :, None, None] * np.eye(K)) / (
        math.sqrt(K) * np.linalg.norm(theta_inf))
    assert float(gaps.kernel_error) == pytest.approx(expected, rel=1e-9)
    assert 0.01 < expected < 10  # a width-8 network is far from the limit, but not absurdly
    # a network whose kernel is the limit itself (Θ_∞ ⊗ I_K, in the library's full layout) has none, and its
    # prediction is f^∞: the eNTK-vs-∞ gaps vanish and real-vs-∞ is the known shift
    _, th_st = _linear_limit(xt, x, depth=2)
    eye = np.eye(K)[None, None]
    f0, f0t = np.asarray(comp.train.real[0]), np.asarray(comp.test.real[0])
    exact = _stand_in(theta_inf[:, :, None, None] * eye, th_st[:, :, None, None] * eye, np.asarray(y), f0, f0t,
                      comp.learning_rate)
    summary = infinite_gaps(exact, model, params, x, y, x_test=xt, y_test=yt).summary()
    assert summary["inf_kernel_error"] < 1e-12
    assert max(v for k, v in summary.items() if k.startswith("inf_lin")) < 1e-10
    d_test = np.linalg.norm(f0t - np.asarray(yt))
    assert summary["inf_real_test_gap_final"] == pytest.approx(OFFSET * math.sqrt(NT * K) / d_test, rel=1e-8)


def test_gap_curves_equal_matrix_powers_of_both_kernels(deep):
    model, params, comp, (x, y, xt, yt), k_all, gaps = deep
    _, th = _linear_limit(x, x, depth=2)
    _, th_st = _linear_limit(xt, x, depth=2)
    f0, f0t, y_np = np.asarray(model(params, x)), np.asarray(model(params, xt)), np.asarray(y)
    d, dt = np.linalg.norm(f0 - y_np), np.linalg.norm(f0t - np.asarray(yt))
    for i, t in enumerate(RECORDS):
        lin = _gd(_flat(k_all[:N, :N]), _flat(k_all[N:, :N]), y_np, f0, f0t, comp.learning_rate, t)
        inf = _gd(np.kron(th, np.eye(K)), np.kron(th_st, np.eye(K)), y_np, f0, f0t, comp.learning_rate, t)
        real = lin[0] + OFFSET * (t > 0), lin[1] + OFFSET * (t > 0)
        for got, a, b, scale in ((gaps.lin_train_gap, lin[0], inf[0], d), (gaps.lin_test_gap, lin[1], inf[1], dt),
                                 (gaps.real_train_gap, real[0], inf[0], d), (gaps.real_test_gap, real[1], inf[1], dt)):
            assert got[i] == pytest.approx(np.linalg.norm(a - b) / scale, rel=1e-7, abs=1e-12)
    s = gaps.summary()
    assert s["inf_lin_test_gap"] == pytest.approx(max(gaps.lin_test_gap)) and s["inf_lin_test_gap"] > 1e-3
    assert s["inf_real_train_gap_final"] == pytest.approx(gaps.real_train_gap[-1])


def test_band_fraction_at_step_0_is_the_prior_check_and_lies_in_0_1(deep):
    model, params, comp, (x, y, xt, yt), _, gaps = deep
    k_nngp, _ = _linear_limit(x, x, depth=2)
    f0 = np.asarray(comp.train.real[0])
    inside = np.abs(f0) <= 2.0 * np.sqrt(np.diag(k_nngp))[:, None]  # t = 0: f₀ against GP(0, K)
    assert gaps.band_train[0] == pytest.approx(inside.mean())
    for band in (gaps.band_train, gaps.band_test):
        assert band.shape == RECORDS.shape and np.all((band >= 0) & (band <= 1))
    assert gaps.summary()["inf_band_test"] == pytest.approx(gaps.band_test[-1])


def test_unsupported_networks_give_nan_and_a_reason_never_an_error(deep):
    _, _, comp, (x, y, xt, yt), _, _ = deep
    res_model, res_params = models.as_apply_fn(nnx.eval_shape(lambda: ResidualMLP(D, K, width=4, depth=1)))
    for model, params, what in ((res_model, res_params, "ResidualMLP"),
                                (lambda p, a: a @ p["w"], {"w": jnp.ones((D, K))}, "plain apply function")):
        gaps = infinite_gaps(comp, model, params, x, y, x_test=xt, y_test=yt)
        assert gaps.note.startswith("not available") and what in gaps.note
        assert all(math.isnan(v) for v in gaps.summary().values()) and gaps.curves() == {}


def test_without_a_closed_form_only_the_kernel_error_and_with_momentum_no_band(deep):
    model, params, comp, (x, y, xt, yt), _, full = deep
    adam = SimpleNamespace(**{**vars(comp), "closed_form": False, "optimizer": "adam"})  # compare's fields
    summary = infinite_gaps(adam, model, params, x, y, x_test=xt, y_test=yt).summary()
    assert summary["inf_kernel_error"] == pytest.approx(float(full.kernel_error))
    assert all(math.isnan(v) for k, v in summary.items() if k != "inf_kernel_error")
    heavy = infinite_gaps(SimpleNamespace(**{**vars(comp), "momentum": 0.5}), model, params, x, y, x_test=xt,
                          y_test=yt)
    assert "heavy-ball" in heavy.note and math.isnan(heavy.summary()["inf_band_test"])
    assert np.isfinite(heavy.summary()["inf_real_test_gap"])


def test_the_fields_read_back_as_a_valid_record_of_this_version(deep):
    *_, gaps = deep
    config = SweepGrid(widths=(8,), samples=(N,), seeds=(0,), steps=6).points()[0]
    assert config["record_version"] == RECORD_VERSION
    rec = {**fake_record(config, **gaps.summary()), "infinite_note": gaps.note}
    rec["curves"].update({k: v.tolist() for k, v in gaps.curves().items()})
    decoded = sweep_module._decode(json.loads(json.dumps(sweep_module._encode(rec))))
    assert sweep_module._classify(decoded) == "ok"


def test_records_of_the_previous_version_are_recomputed_not_misread(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_module, "run_point", lambda config, data_cache=None: fake_record(config))
    old = []
    for config in GRID.points():
        older = {k: v for k, v in config.items() if k != "record_version"}
        old.append(line({**fake_record(config), "config": older, "key": sweep_module.point_key(older)}))
    (tmp_path / RESULTS_FILE).write_text("".join(old))
    outcome = sweep(GRID, tmp_path)
    assert outcome.ran == len(old) and outcome.left_out == {"schema": len(old)}


# --------------------------------------------------------------------------- #
# the report
# --------------------------------------------------------------------------- #


def _power_law_records():
    """widths 8 … 64, 2 seeds: kernel error 2 s w^−½, eNTK-vs-∞ 0.5 s w^−½, real-vs-∞ 0.6 s w^−½, band 0.95."""
    grid = SweepGrid(widths=(8, 16, 32, 64), samples=(4,), seeds=(0, 1), steps=5)
    recs = []
    for c in grid.points():
        s, w = 1 + c["seed"], c["width"]
        rec = fake_record(c, test_gap=0.3 * s / w, inf_kernel_error=2 * s / math.sqrt(w),
                          inf_lin_test_gap=0.5 * s / math.sqrt(w), inf_real_test_gap=0.6 * s / math.sqrt(w),
                          inf_lin_train_gap=0.4 * s / math.sqrt(w), inf_real_train_gap=0.4 * s / math.sqrt(w),
                          inf_band_test=0.95, inf_band_train=0.5)
        rec["infinite_note"] = ""
        recs.append(rec)
    return recs


def test_report_has_the_slopes_the_band_sentence_and_the_three_gap_figure(tmp_path, monkeypatch):
    for name in ("_plot_vs_width", "_plot_breakdown"):  # drawn and tested elsewhere: empty files here
        monkeypatch.setattr(report_module, name, lambda recs, *args: Path(args[-2]).touch())
    monkeypatch.setattr(report_module, "_plot_curves", lambda records, path: None)
    recs = _power_law_records()
    (row,) = slope_table(recs, metrics=("inf_kernel_error",))
    assert row["slope_mean"] == pytest.approx(-0.5) and row["slope_std"] == pytest.approx(0.0, abs=1e-12)
    assert row["slope_of_mean"] == pytest.approx(-0.5) and row["seeds"] == 2
    (tmp_path / RESULTS_FILE).write_text("".join(line(r) for r in recs))
    written = write_report(tmp_path)
    assert "infinite_width.png" in written and (tmp_path / "infinite_width.png").stat().st_size > 10_000
    assert "slope_of_mean" in (tmp_path / "slopes.csv").read_text().splitlines()[0]
    md = (tmp_path / "report.md").read_text()
    section = md[md.index("## Infinite width"):]
    assert "-0.50 ± 0.00 / -0.50" in section  # kernel error (and the gaps), per seed and of the seed mean
    assert "Available for 8 of 8 points" in section
    assert "median 95 % of the real test outputs" in section and "8 of 8 points have at least 90 %" in section
    assert "![three gaps against width](infinite_width.png)" in section
    rows = infinite_rows(recs)
    assert [r["width"] for r in rows] == [8, 16, 32, 64] and rows[0]["±2σ coverage"] == pytest.approx(0.95)


def test_report_text_names_the_points_without_infinite_metrics():
    recs = _power_law_records()
    unsupported = fake_record({**recs[0]["config"], "model": "resmlp"},
                              **{name: float("nan") for name in INFINITE_METRICS})
    unsupported["infinite_note"] = "not available: the analytic kernels cover ntkdyn.models.MLP and CNN"
    text = infinite_text(recs + [unsupported])
    assert "Available for 8 of 9 points" in text and "- 1 point: not available: the analytic kernels" in text
    old = [fake_record(c) for c in GRID.points()]  # records that never had the fields
    text = infinite_text(old)
    assert "Not available for any point" in text and f"{len(old)} points: not recorded" in text
    assert infinite_rows(old) == []
