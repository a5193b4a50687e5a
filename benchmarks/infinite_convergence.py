"""Infinite-width kernels: convergence, Monte-Carlo agreement, quadrature accuracy, speed, and neural-tangents.

The checks of :mod:`ntkdyn.infinite` too slow for the test suite. Run from the
repository root; each part is a subcommand (all of them by default)::

    python benchmarks/infinite_convergence.py [convergence] [monte-carlo] [quadrature] [timing]
    python benchmarks/infinite_convergence.py peers --python benchmarks/peers/.venv/bin/python

* ``convergence``: relative Frobenius error ‖Θ_emp − Θ_∞‖/‖Θ_∞‖ of the
  empirical NTK (``ntkdyn.empirical_ntk``, output-traced) against width, per
  seed and of the mean over seeds, for MLPs and CNNs, with log-log slopes
  (expected −½ per seed; the mean over S seeds falls faster until its
  O(1/width) bias shows).
* ``monte-carlo``: every activation × parameterization (MLP) and every
  padding × stride × readout (CNN): the largest |MC − analytic| in standard
  errors (NNGP from the output covariance over seeds, NTK from the mean
  empirical NTK) and the largest deviation relative to the diagonal.
* ``quadrature``: the error of the Gaussian expectations ``E[φφ]``, ``E[φ'φ']``
  against a 4000² trapezoid reference, for our Hermite series and for 2-D
  trapezoid and Gauss–Hermite product rules, against the pre-activation variance.
* ``timing``: warm and first-call (compile) seconds of :func:`ntkdyn.infinite.kernels`.
* ``peers``: the same kernels and ensemble predictions from neural-tangents
  0.6.5 (``stax`` + ``predict.gradient_descent_mse_ensemble``) in its own
  virtual environment (``bash benchmarks/peers/setup_venv.sh``; only jax,
  jaxlib, numpy, scipy and neural-tangents are needed), run as a subprocess
  of this file; prints the largest relative difference per configuration.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------- #
# the neural-tangents side (runs inside the peers venv: numpy, jax and neural_tangents only)
# --------------------------------------------------------------------------- #


def nt_runner(config_path: str, data_path: str, out_path: str) -> None:
    """Compute neural-tangents' analytic kernels and ensemble predictions for every configuration."""
    import types

    # its experimental subpackage imports TensorFlow, which the kernels do not need
    sys.modules["neural_tangents.experimental"] = types.ModuleType("neural_tangents.experimental")
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import neural_tangents as nt
    from neural_tangents import stax

    acts = {"erf": stax.Erf, "relu": stax.Relu, "linear": stax.Identity,
            "tanh": lambda: stax.ElementwiseNumerical(jnp.tanh, deg=100),
            "sigmoid": lambda: stax.ElementwiseNumerical(jax.nn.sigmoid, deg=100)}
    configs, data, out = json.loads(Path(config_path).read_text()), np.load(data_path), {}
    for name, c in configs.items():
        common = dict(W_std=c["sigma_w"], b_std=c["sigma_b"], parameterization=c.get("parameterization", "ntk"))
        layers = []
        if c["kind"] == "MLP":
            for _ in range(c["depth"]):
                layers += [stax.Dense(c["width"], **common), acts[c["activation"]]()]
        else:
            for ch in c["channels"]:
                layers += [stax.Conv(ch, (c["kernel_size"],) * 2, strides=(c["strides"],) * 2,
                                     padding=c["padding"], **common), acts[c["activation"]]()]
            layers.append(stax.Flatten() if c["readout"] == "flatten" else stax.GlobalAvgPool())
        layers.append(stax.Dense(1, **common))
        kernel_fn = stax.serial(*layers)[2]
        x, xt = data[name + "/x"], data[name + "/xt"]
        k = kernel_fn(x, None, ("nngp", "ntk"))
        out[name + "/nngp"], out[name + "/ntk"] = np.asarray(k.nngp), np.asarray(k.ntk)
        if "lr" in c:
            predict = nt.predict.gradient_descent_mse_ensemble(kernel_fn, x, data[name + "/y"],
                                                               learning_rate=c["lr"], diag_reg=c["diag_reg"])
            for get in ("ntk", "nngp"):
                mean, cov = predict(np.asarray(c["t"]), xt, get, compute_cov=True)
                out[f"{name}/{get}/mean_test"], out[f"{name}/{get}/cov_test"] = np.asarray(mean), np.asarray(cov)
                mean, cov = predict(np.asarray(c["t"]), None, get, compute_cov=True)
                out[f"{name}/{get}/mean_train"], out[f"{name}/{get}/cov_train"] = np.asarray(mean), np.asarray(cov)
    np.savez(out_path, **out)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "nt-runner":
    nt_runner(*sys.argv[2:5])
    sys.exit(0)

# --------------------------------------------------------------------------- #
# our side
# --------------------------------------------------------------------------- #

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import ntkdyn  # noqa: E402
from ntkdyn import infinite, models  # noqa: E402


def build(config: dict, outputs: int = 1, rngs=None):
    """An MLP/CNN instance from a configuration dict (the builders' keywords plus kind, in_features/input_shape)."""
    c = {k: v for k, v in config.items() if k not in ("kind", "lr", "diag_reg", "t")}
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    if config["kind"] == "MLP":
        return models.MLP(c.pop("in_features"), outputs, rngs=rngs, **c)
    if "channels" in c:
        c["channels"] = tuple(c["channels"])
    return models.CNN(tuple(c.pop("input_shape")), outputs, rngs=rngs, **c)


def ensemble(make, seeds: int, key: int = 0):
    """(apply_fn, params stacked over ``seeds`` initializations), one compiled init."""
    apply_fn, _ = models.as_apply_fn(make(nnx.Rngs(0)))
    init = lambda k: nnx.split(make(nnx.Rngs(k)), nnx.Param, ...)[1]
    return apply_fn, jax.jit(jax.vmap(init))(jax.random.split(jax.random.PRNGKey(key), seeds))


def empirical(apply_fn, params, x):
    """Output-traced empirical NTK of every network of a stacked ensemble, (S, N, N)."""
    return jax.lax.map(lambda p: ntkdyn.empirical_ntk(apply_fn, p, x, trace_outputs=True, method="jacobian"), params)


def slope(widths, values) -> float:
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


# --------------------------------------------------------------------------- #
# convergence
# --------------------------------------------------------------------------- #


def convergence(args) -> None:
    cases = {
        "MLP erf, depth 2": (dict(kind="MLP", in_features=4, depth=2, activation="erf"), (6, 4), args.widths),
        "MLP relu, depth 3": (dict(kind="MLP", in_features=4, depth=3, activation="relu"), (6, 4), args.widths),
        "CNN relu SAME, flatten": (dict(kind="CNN", input_shape=(6, 6, 2), activation="relu"), (4, 6, 6, 2),
                                   args.channels),
        "CNN relu SAME stride 2, pool": (dict(kind="CNN", input_shape=(6, 6, 2), activation="relu", strides=2,
                                              readout="gap"), (4, 6, 6, 2), args.channels),
    }
    print(f"\n## eNTK -> NTK: relative Frobenius error vs width ({args.seeds} seeds)\n")
    for name, (config, shape, widths) in cases.items():
        x = jax.random.normal(jax.random.PRNGKey(0), shape)
        small = {"width": 8} if config["kind"] == "MLP" else {"channels": (8, 8)}
        exact = infinite.kernels(build(config | small), x).ntk  # the width does not matter (NTK parameterization)
        per_seed, of_mean, seconds = [], [], []
        for w in widths:
            size = {"width": w} if config["kind"] == "MLP" else {"channels": (w, w)}
            start = time.perf_counter()
            apply_fn, params = ensemble(lambda r: build(config | size, 1, r), args.seeds, key=w)
            ks = empirical(apply_fn, params, x)
            per_seed.append(np.linalg.norm(ks - exact, axis=(1, 2)) / np.linalg.norm(exact))
            of_mean.append(float(np.linalg.norm(ks.mean(0) - exact) / np.linalg.norm(exact)))
            seconds.append(time.perf_counter() - start)
        per_seed = np.array(per_seed)
        slopes = [slope(widths, per_seed[:, s]) for s in range(per_seed.shape[1])]
        print(f"{name}: widths {list(widths)}")
        print("  per seed (median [min, max]): " + ", ".join(
            f"{np.median(r):.3g} [{r.min():.2g}, {r.max():.2g}]" for r in per_seed))
        print("  mean over seeds:              " + ", ".join(f"{v:.3g}" for v in of_mean))
        print(f"  slope per seed: median {np.median(slopes):.3f} (min {min(slopes):.3f}, max {max(slopes):.3f}); "
              f"slope of the seed-RMS error {slope(widths, np.sqrt((per_seed**2).mean(1))):.3f}; "
              f"slope of the mean over seeds {slope(widths, of_mean):.3f}; {sum(seconds):.1f} s")


# --------------------------------------------------------------------------- #
# Monte Carlo
# --------------------------------------------------------------------------- #


def monte_carlo(args) -> None:
    mlp = dict(kind="MLP", in_features=4, width=args.mc_width, depth=2, sigma_w=1.4, sigma_b=0.3)
    cnn = dict(kind="CNN", input_shape=(5, 5, 2), channels=(args.mc_width // 4,) * 2)
    cases = {}
    for act in models.ACTIVATIONS:
        for par in models.PARAMETERIZATIONS:
            cases[f"MLP {act} {par}"] = mlp | dict(activation=act, parameterization=par)
    cases["MLP relu no bias"] = mlp | dict(activation="relu", sigma_b=None)
    for pad in ("SAME", "VALID"):
        for stride in (1, 2):
            for readout in ("flatten", "gap"):
                chans = (args.mc_width // 4,) if (pad, stride) == ("VALID", 2) else cnn["channels"]
                cases[f"CNN {pad} stride {stride} {readout}"] = cnn | dict(
                    padding=pad, strides=stride, readout=readout, channels=chans)
    cases["CNN tanh standard gap"] = cnn | dict(activation="tanh", parameterization="standard", readout="gap")
    print(f"\n## Monte Carlo vs analytic ({args.mc_seeds} seeds; NNGP from {args.mc_outputs} outputs per seed)\n")
    print("| case | NNGP max z | NNGP max rel. dev. | NTK max z | NTK max rel. dev. | s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, config in cases.items():
        start = time.perf_counter()
        shape = (5, 4) if config["kind"] == "MLP" else (3, 5, 5, 2)
        x = jax.random.normal(jax.random.PRNGKey(1), shape)
        exact = infinite.kernels(build(config), x)
        make_k = lambda k: (lambda r: build(config, k, r))
        apply_fn, params = ensemble(make_k(args.mc_outputs), args.mc_seeds)
        f = jax.vmap(apply_fn, (0, None))(params, x)
        samples = f.shape[0] * f.shape[2]
        nngp = np.asarray(jnp.einsum("sik,sjk->ij", f, f) / samples)
        d = np.diag(np.asarray(exact.nngp))
        scale = np.sqrt(np.outer(d, d))
        nngp_z = np.abs(nngp - exact.nngp) / np.sqrt((scale**2 + np.asarray(exact.nngp) ** 2) / samples)
        apply_1, params_1 = ensemble(make_k(1), args.mc_seeds, key=1)
        ks = np.asarray(empirical(apply_1, params_1, x))
        dt = np.diag(np.asarray(exact.ntk))
        ntk_dev = np.abs(ks.mean(0) - exact.ntk)
        ntk_z = ntk_dev / (ks.std(0) / np.sqrt(args.mc_seeds) + 1e-300)
        print(f"| {name} | {nngp_z.max():.2f} | {(np.abs(nngp - exact.nngp) / scale).max():.3f} | "
              f"{ntk_z.max():.2f} | {(ntk_dev / np.sqrt(np.outer(dt, dt))).max():.4f} | "
              f"{time.perf_counter() - start:.1f} |", flush=True)


# --------------------------------------------------------------------------- #
# quadrature accuracy
# --------------------------------------------------------------------------- #


def quadrature(args) -> None:
    from numpy.polynomial.hermite_e import hermegauss

    z_ref = np.arange(-10.0, 10.0 + 1e-9, 0.005)
    w_ref = np.exp(-0.5 * z_ref**2)
    w_ref /= w_ref.sum()

    def rule_2d(f, v, rho, z, w):
        u = np.sqrt(v) * z
        vv = np.sqrt(v) * (rho * z[:, None] + np.sqrt(1 - rho**2) * z[None, :])
        return float(np.sum(w[:, None] * f(u)[:, None] * w[None, :] * f(vv)))

    def reference(f, v, rho):
        total, fu = 0.0, f(np.sqrt(v) * z_ref)
        for i in range(0, z_ref.size, 250):  # blocks keep memory at 250 × 4000
            vv = np.sqrt(v) * (rho * z_ref[i:i + 250, None] + np.sqrt(1 - rho**2) * z_ref[None, :])
            total += float(np.sum(w_ref[i:i + 250, None] * fu[i:i + 250, None] * w_ref[None, :] * f(vv)))
        return total

    q = args.points
    z_tr = np.linspace(-8.5, 8.5, q)
    w_tr = np.exp(-0.5 * z_tr**2)
    w_tr /= w_tr.sum()
    z_gh, w_gh = hermegauss(q)
    w_gh /= w_gh.sum()
    rhos = (0.0, 0.5, 0.9, 0.99, 1.0)
    print(f"\n## Gaussian expectations: worst error over ρ ∈ {rhos}, relative to E[φ(u)²] | E[φ'(u)²]\n")
    print(f"ours: Hermite series, {infinite.HERMITE_TERMS} terms ({infinite.HERMITE_TERMS} multiply-adds per pair); "
          f"2-D product rules with {q}² = {q * q} activation calls per pair. Reference: 4000² trapezoid.\n")
    print("| activation | variance | series (ours) φ | φ' | trapezoid φ | φ' | Gauss–Hermite φ | φ' |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.activations:
        fn = models.ACTIVATIONS[name]
        f = lambda a, fn=fn: np.asarray(fn(jnp.asarray(a)))
        slope_fn = jax.vmap(jax.grad(fn))
        df = lambda a: np.asarray(slope_fn(jnp.asarray(a, float).ravel())).reshape(np.shape(a))
        for v in args.variances:
            errors = np.zeros(6)
            norm_f, norm_d = reference(f, v, 1.0), reference(df, v, 1.0)
            for rho in rhos:
                ref_f, ref_d = reference(f, v, rho), reference(df, v, rho)
                ours = infinite.moments(name, rho * v, v, v, method="series")
                errors = np.maximum(errors, [
                    abs(float(ours[0]) - ref_f) / norm_f, abs(float(ours[1]) - ref_d) / norm_d,
                    abs(rule_2d(f, v, rho, z_tr, w_tr) - ref_f) / norm_f,
                    abs(rule_2d(df, v, rho, z_tr, w_tr) - ref_d) / norm_d,
                    abs(rule_2d(f, v, rho, z_gh, w_gh) - ref_f) / norm_f,
                    abs(rule_2d(df, v, rho, z_gh, w_gh) - ref_d) / norm_d,
                ])
            print(f"| {name} | {v:g} | " + " | ".join(f"{e:.0e}" for e in errors) + " |", flush=True)
    print("\n(errors near 3e-13 are the reference's own round-off)")


# --------------------------------------------------------------------------- #
# timing
# --------------------------------------------------------------------------- #


def timing(args) -> None:
    cases = [
        ("MLP erf depth 3", dict(kind="MLP", in_features=16, depth=3, activation="erf"), (args.n, 16)),
        ("MLP tanh depth 3 (Hermite series)", dict(kind="MLP", in_features=16, depth=3, activation="tanh"), (args.n, 16)),
        ("CNN relu 8x8 SAME, flatten", dict(kind="CNN", input_shape=(8, 8, 3), activation="relu"),
         (args.n // 4, 8, 8, 3)),
        ("CNN relu 8x8 SAME, pool", dict(kind="CNN", input_shape=(8, 8, 3), activation="relu", readout="gap"),
         (args.n // 16, 8, 8, 3)),
    ]
    print("\n## infinite.kernels seconds (x1 = x2 = x)\n")
    print("| case | N | first call (compile + run) | warm | tile |")
    print("| --- | --- | --- | --- | --- |")
    for name, config, shape in cases:
        model = build(config)
        x = jax.random.normal(jax.random.PRNGKey(0), shape)
        start = time.perf_counter()
        jax.block_until_ready(infinite.kernels(model, x))
        first = time.perf_counter() - start
        warm = []
        for i in range(3):
            start = time.perf_counter()
            jax.block_until_ready(infinite.kernels(model, x + 1e-3 * (i + 1)))
            warm.append(time.perf_counter() - start)
        arch = infinite.architecture(model)
        print(f"| {name} | {shape[0]} | {first:.2f} | {np.median(warm):.3f} | "
              f"{infinite._auto_tile(arch, shape[0], infinite.HERMITE_TERMS)} |", flush=True)


# --------------------------------------------------------------------------- #
# neural-tangents
# --------------------------------------------------------------------------- #


def peers(args) -> None:
    rng = np.random.default_rng(0)
    configs, data = {}, {}

    def add(name, config, shape, test_shape, predict=None):
        configs[name] = config | (predict or {})
        data[name + "/x"], data[name + "/xt"] = rng.normal(size=shape), rng.normal(size=test_shape)
        if predict:
            data[name + "/y"] = rng.normal(size=(shape[0], 1))

    mlp = dict(kind="MLP", in_features=3, width=64, depth=2, sigma_w=1.5, sigma_b=0.05)
    for act in ("erf", "relu", "linear", "tanh", "sigmoid"):
        for par in models.PARAMETERIZATIONS:
            add(f"MLP {act} {par}", mlp | dict(activation=act, parameterization=par), (6, 3), (3, 3))
    add("MLP relu no bias", mlp | dict(activation="relu", sigma_b=None), (6, 3), (3, 3))
    add("MLP relu standard b=0", mlp | dict(activation="relu", sigma_b=0.0, parameterization="standard"),
        (6, 3), (3, 3))
    for pad in ("SAME", "VALID"):
        for stride in (1, 2):
            for readout in ("flatten", "gap"):
                for par in models.PARAMETERIZATIONS:
                    chans = [8] if (pad, stride) == ("VALID", 2) else [8, 8]
                    add(f"CNN {pad} stride {stride} {readout} {par}",
                        dict(kind="CNN", input_shape=(6, 6, 2), channels=chans, kernel_size=3, strides=stride,
                             padding=pad, readout=readout, activation="relu", sigma_w=1.5, sigma_b=0.05,
                             parameterization=par), (4, 6, 6, 2), (2, 6, 6, 2))
    add("CNN tanh gap", dict(kind="CNN", input_shape=(6, 6, 2), channels=[8, 8], kernel_size=3, strides=1,
                             padding="SAME", readout="gap", activation="tanh", sigma_w=1.5, sigma_b=0.05,
                             parameterization="ntk"), (4, 6, 6, 2), (2, 6, 6, 2))
    for reg, lr in ((0.0, 1.0), (0.1, 0.5)):
        add(f"MLP erf ensemble, diag_reg {reg}", mlp | dict(activation="erf", parameterization="ntk"), (6, 3), (3, 3),
            predict=dict(lr=lr, diag_reg=reg, t=[0.0, 1.0, 10.0, 100.0]))

    with tempfile.TemporaryDirectory() as tmp:
        cfg, dat, out = (str(Path(tmp) / n) for n in ("configs.json", "data.npz", "nt.npz"))
        Path(cfg).write_text(json.dumps(configs))
        np.savez(dat, **data)
        subprocess.run([args.python, __file__, "nt-runner", cfg, dat, out], check=True)
        nt = dict(np.load(out))

    rel = lambda ours, theirs: float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())
    print("\n## ntkdyn.infinite vs neural-tangents 0.6.5 (largest |difference| / largest |value|)\n")
    print("| configuration | NNGP | NTK | ensemble (ntk): mean, cov (test); mean, cov (train) | "
          "ensemble (nngp): the same |")
    print("| --- | --- | --- | --- | --- |")
    for name, c in configs.items():
        model = build(c)
        x, xt = data[name + "/x"], data[name + "/xt"]
        k = infinite.kernels(model, x)
        cells = [f"{rel(k.nngp, nt[name + '/nngp']):.1e}", f"{rel(k.ntk, nt[name + '/ntk']):.1e}"]
        if c["activation"] not in infinite.CLOSED_FORMS:  # our own series error: against 4x the terms
            longer = infinite.kernels(model, x, hermite_terms=4 * infinite.HERMITE_TERMS)
            cells[1] += f" (ours vs {4 * infinite.HERMITE_TERMS} terms: {rel(k.ntk, np.asarray(longer.ntk)):.0e})"
        if "lr" in c:
            for get in ("ntk", "nngp"):
                p = infinite.predict(model, x, data[name + "/y"], jnp.asarray(c["t"]), x_test=xt,
                                     learning_rate=c["lr"], diag_reg=c["diag_reg"], get=get)
                cells.append(", ".join(f"{rel(a, nt[f'{name}/{get}/{b}']):.1e}" for a, b in (
                    (p.mean_test, "mean_test"), (p.cov_test, "cov_test"),
                    (p.mean_train, "mean_train"), (p.cov_train, "cov_train"))))
        else:
            cells += ["", ""]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print("\nneural-tangents integrates tanh/sigmoid by 2-D Gauss–Hermite (deg=100 here), ours by a Hermite series;\n"
          "with diag_reg > 0 neural-tangents' nngp mode also regularizes the prior covariance "
          "(ours: the dynamics only).")


# --------------------------------------------------------------------------- #


PARTS = {"convergence": convergence, "monte-carlo": monte_carlo, "quadrature": quadrature, "timing": timing,
         "peers": peers}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("parts", nargs="*", default=[], help=f"any of {', '.join(PARTS)} (default: all but peers)")
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--mc-width", type=int, default=512)
    p.add_argument("--mc-seeds", type=int, default=32)
    p.add_argument("--mc-outputs", type=int, default=64)
    p.add_argument("--points", type=int, default=96, help="nodes per dimension of the 2-D rules compared with")
    p.add_argument("--activations", nargs="+", default=["tanh", "sigmoid", "gelu"])
    p.add_argument("--variances", type=float, nargs="+", default=[0.3, 1.0, 3.0, 10.0, 30.0])
    p.add_argument("--n", type=int, default=512, help="inputs for the timing part")
    p.add_argument("--python", default=str(Path(__file__).resolve().parent / "peers" / ".venv" / "bin" / "python"),
                   help="the interpreter of the neural-tangents venv (peers part)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    parts = args.parts or [p for p in PARTS if p != "peers"]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"parts: expected any of {tuple(PARTS)}, got {unknown}")
    for part in parts:
        PARTS[part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
