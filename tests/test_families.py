"""Sweeps on model families: built-ins, your own by import path (hashed source), seed batching, and the
issue-12 done-when run (a user-written flax CNN on an .npz of 8×8×1 images, Adam, minibatches).

Oracles: the built-in mlp family is the historical sweep MLP (same arrays); a family's configuration
re-imports the family from results.jsonl alone; a seed group's records equal one-by-one records
(float64, round-off); a changed source is a new key and an old config is refused.
"""

import inspect
import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

from ntkdyn import models
from ntkdyn.experiments import families
from ntkdyn.experiments.cli import main
from ntkdyn.experiments import sweep as sweep_module
from ntkdyn.experiments.report import slope_table
from ntkdyn.experiments.sweep import (
    SweepGrid,
    load_results,
    point_key,
    run_point,
    run_points_batched,
    run_seed_group,
    seed_groups,
)

TINY = dict(samples=(6,), seeds=(0,), steps=8, n_test=4, num_records=3, dtype="float64")

# the documented example (docs/own_models.md): a flax CNN whose weights are p/√width, so that an Adam
# step moves each weight by ~lr/√width and the network trains lazily as it widens
CNN_FAMILY = textwrap.dedent('''
    import jax
    from flax import nnx


    class CNN(nnx.Module):
        def __init__(self, width, in_channels, out_features, *, rngs):
            self.width = width
            self.scale = width ** 0.5
            init = nnx.initializers.normal(stddev=self.scale)
            self.conv1 = nnx.Conv(in_channels, width, (3, 3), kernel_init=init, use_bias=False, rngs=rngs)
            self.conv2 = nnx.Conv(width, width, (3, 3), kernel_init=init, use_bias=False, rngs=rngs)
            self.head = nnx.Linear(width, out_features, kernel_init=init, use_bias=False, rngs=rngs)
            self.fan_in = 9 * in_channels

        def __call__(self, x):
            s = self.scale
            h = jax.nn.relu(self.conv1(x) / (s * self.fan_in ** 0.5))
            h = jax.nn.relu(self.conv2(h) / (s * (9 * self.width) ** 0.5))
            return self.head(h.mean(axis=(1, 2))) / (s * self.width ** 0.5)


    def family(width, *, seed, input_shape, out_features):
        return CNN(width, input_shape[-1], out_features, rngs=nnx.Rngs(seed))
''')


def linen_family(width, *, seed, input_shape, out_features):
    """A linen family: returns (module, variables)."""
    net = linen.Sequential([linen.Dense(width), linen.tanh, linen.Dense(out_features)])
    return net, net.init(jax.random.key(seed), jnp.zeros((1, *input_shape)))


def plain_family(width, *, seed, input_shape, out_features):
    """A plain (apply_fn, params) family, fixed activation (takes no option keywords)."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"w1": jax.random.normal(k1, (input_shape[0], width)) / np.sqrt(input_shape[0]),
              "w2": jax.random.normal(k2, (width, out_features)) / np.sqrt(width)}
    return plain_apply, params


def plain_apply(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


def images_npz(path, n_train=64, n_test=32, classes=3):
    """sklearn's 8×8 digits of ``classes`` classes as 8×8×1 images in [0, 1] with integer labels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(n_class=classes, return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))[: n_train + n_test]
    x = (x[order] / 16.0).reshape(-1, 8, 8, 1).astype(np.float32)
    y = y[order]
    np.savez(path, x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:], y_test=y[n_train:])
    return path


# --------------------------------------------------------------------------- #
# built-in families
# --------------------------------------------------------------------------- #


def test_mlp_family_is_the_historical_sweep_mlp():
    net = families.mlp(16, seed=3, input_shape=(5,), out_features=2, depth=2, activation="erf",
                       parameterization="ntk", sigma_w=1.5, sigma_b=0.05, dtype="float64")
    ref = models.MLP(5, 2, width=16, depth=2, activation="erf", parameterization="ntk", sigma_w=1.5, sigma_b=0.05,
                     rngs=nnx.Rngs(3), dtype="float64")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5)))
    np.testing.assert_array_equal(net(x), ref(x))
    # images: flattened first, same numbers as the flat MLP on flattened inputs
    img = families.mlp(16, seed=3, input_shape=(2, 5, 1), out_features=2, dtype="float64")
    flat = models.MLP(10, 2, width=16, rngs=nnx.Rngs(3), depth=2, dtype="float64")
    xi = jnp.asarray(np.random.default_rng(1).standard_normal((4, 2, 5, 1)))
    np.testing.assert_array_equal(img(xi), flat(xi.reshape(4, 10)))


@pytest.mark.parametrize("name,shape", [("cnn", (6, 6, 2)), ("resmlp", (7,)), ("resmlp", (3, 3, 1))])
def test_builtin_families_build_at_their_width(name, shape):
    fn = families.load(name)
    model, params = families.build(fn, 5, seed=0, input_shape=shape, out_features=3,
                                   options={"depth": 2, "activation": "relu", "dtype": "float64"})
    out = model(params, jnp.ones((4, *shape)))
    assert out.shape == (4, 3) and out.dtype == jnp.float64 and bool(jnp.all(jnp.isfinite(out)))
    widths = {leaf.shape[-1] for leaf in jax.tree_util.tree_leaves(params) if leaf.ndim >= 2}
    assert 5 in widths


def test_cnn_family_needs_images():
    with pytest.raises(ValueError, match="input_shape"):
        families.cnn(4, seed=0, input_shape=(64,), out_features=2)


def test_residual_block_is_pre_layernorm_with_scaled_branches():
    net = families.ResidualMLP(3, 1, width=6, depth=4, rngs=nnx.Rngs(0), dtype="float64")
    assert net.branch_scale == pytest.approx(0.5) and len(net.norms) == 4
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3)))
    h = net.embed(x)
    for ln, inner, outer in zip(net.norms, net.inner, net.outer):
        h = h + 0.5 * outer(jax.scipy.special.erf(inner(ln(h))))
    np.testing.assert_allclose(net(x), net.readout(net.final_norm(h)), rtol=1e-12)


def test_residual_mlp_takes_the_mlp_options_with_their_defaults():
    defaults = inspect.signature(models.MLP.__init__).parameters
    net = families.ResidualMLP(3, 1, width=4, depth=1)
    layer = net.readout
    assert net.activation == defaults["activation"].default
    assert (layer.parameterization, layer.sigma_w, layer.sigma_b) == tuple(
        defaults[name].default for name in ("parameterization", "sigma_w", "sigma_b")
    )
    with pytest.raises(TypeError, match="channels"):
        families.ResidualMLP(3, 1, channels=(4,))


# --------------------------------------------------------------------------- #
# your own family: import path, source hash, options
# --------------------------------------------------------------------------- #


def test_file_family_is_recorded_by_path_and_hash_and_rerun_from_results_alone(tmp_path):
    src = tmp_path / "fam.py"
    src.write_text(textwrap.dedent('''
        from ntkdyn import models
        from flax import nnx

        def family(width, *, seed, input_shape, out_features):
            return models.MLP(input_shape[0], out_features, width=width, depth=1, rngs=nnx.Rngs(seed),
                              dtype="float64")
    '''))
    grid = SweepGrid(widths=(4,), model=f"{src}:family", **TINY)
    (config,) = grid.points()
    assert config["model"] == f"{src.resolve()}:family" and len(config["model_hash"]) == 16
    # options the family does not take are recorded as unused
    assert (config["depth"], config["activation"], config["parameterization"]) == (0, "", "")
    json.dumps(config)  # JSON-ready
    rec = run_point(json.loads(json.dumps(config)))  # from the config alone
    assert rec["key"] == point_key(config) and np.isfinite(rec["metrics"]["lin_trained_test_gap"])

    # changed code: a new key, and the old config is refused rather than silently rerun
    src.write_text(src.read_text() + "\n# edited\n")
    (changed,) = grid.points()
    assert changed["model_hash"] != config["model_hash"] and point_key(changed) != point_key(config)
    with pytest.raises(ValueError, match="model: the source of .* changed"):
        run_point(config)


def test_module_path_function_object_and_builtin_names_resolve():
    spec, digest = families.resolve("test_families:plain_family")
    assert spec == "test_families:plain_family" and len(digest) == 16
    assert families.resolve(plain_family) == (spec, digest)
    assert families.resolve(families.cnn) == ("cnn", "")
    assert families.load(spec, digest) is plain_family


@pytest.mark.parametrize("family", [linen_family, plain_family])
def test_linen_and_plain_families_sweep(family):
    (config,) = SweepGrid(widths=(4,), model=family, **TINY).points()
    rec = run_point(config)
    assert rec["config"]["model"] == f"test_families:{family.__name__}"
    m = rec["metrics"]
    assert m["closed_form"] and m["lin_consistency"] < 1e-8
    # full-batch GD: the trained f_lin is the discrete closed form, so both gaps agree to round-off
    assert m["lin_trained_test_gap"] == pytest.approx(m["test_gap"], rel=1e-6, abs=1e-10)


@pytest.mark.parametrize(
    "model,match",
    [
        ("no_such_family", "model"),
        ("/no/such/file.py:family", "model: no such file"),
        ("test_families:missing", "no attribute"),
        ("test_families:images_npz", "must take family"),
        ("os.path:join", "must take family"),
        (lambda width, *, seed, input_shape, out_features: None, "top level"),
    ],
)
def test_bad_family_specs_are_errors_naming_model(model, match):
    with pytest.raises(ValueError, match=match):
        SweepGrid(widths=(4,), model=model, **TINY).points()


def test_options_a_family_does_not_take_must_stay_default():
    with pytest.raises(ValueError, match="depths: the model family .* takes no depth"):
        SweepGrid(widths=(4,), model=plain_family, depths=(3,), **TINY).validate()


def test_a_family_returning_something_else_is_a_type_error():
    with pytest.raises(TypeError, match="model: .* returned int"):
        families.build(lambda width, *, seed, input_shape, out_features: 3, 4, seed=0, input_shape=(2,),
                       out_features=1)


# --------------------------------------------------------------------------- #
# seeds in one compiled call
# --------------------------------------------------------------------------- #


def _content(record):
    return {k: v for k, v in record.items() if k not in ("timings", "seconds", "finished", "seed_batch")}


def test_seed_group_records_equal_one_by_one_records():
    configs = SweepGrid(widths=(6,), samples=(6,), seeds=(0, 1, 2), steps=10, n_test=4, num_records=3,
                        dtype="float64", depths=(1,), optimizer="adam", learning_rates=(0.05,), batch_size=3).points()
    assert [len(g) for g in seed_groups(configs)] == [3] and [len(g) for g in seed_groups(configs, 2)] == [2, 1]
    batched = run_seed_group(configs)
    for config, rec in zip(configs, batched):
        one = run_point(config)
        assert rec["seed_batch"] == 3 and set(rec["timings"]) == {"setup", "compile", "run"}
        a, b = _content(one), _content(rec)
        assert a["key"] == b["key"] and a["config"] == b["config"]
        for name, value in a["metrics"].items():
            assert b["metrics"][name] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), name
        for name, curve in a["curves"].items():
            np.testing.assert_allclose(b["curves"][name], curve, rtol=1e-9, atol=1e-12, err_msg=name)
    # the seeds are other networks and other minibatch orders
    assert len({r["metrics"]["loss_final"] for r in batched}) == 3


def test_points_that_cannot_be_batched_run_one_by_one(tmp_path, monkeypatch):
    src = tmp_path / "odd.py"
    src.write_text(textwrap.dedent('''
        from ntkdyn import models
        from flax import nnx

        def family(width, *, seed, input_shape, out_features):  # depth depends on the seed: no common graph
            return models.MLP(input_shape[0], out_features, width=width, depth=1 + seed % 2, rngs=nnx.Rngs(seed),
                              dtype="float64")
    '''))
    configs = SweepGrid(widths=(4,), model=f"{src}:family", **{**TINY, "seeds": (0, 1, 2)}).points()
    with pytest.raises(ValueError, match="members: the initializations must share one architecture"):
        run_seed_group(configs)  # refused at stacking, before anything is compiled

    ran = []

    def one(config, data_cache=None):  # the per-point fallback, without computing anything
        if config["seed"] == 2:
            raise RuntimeError("boom")
        ran.append(config["seed"])
        return {"key": point_key(config)}

    monkeypatch.setattr(sweep_module, "run_point", one)
    out = list(run_points_batched(configs))
    assert ran == [0, 1] and [c["seed"] for c, _, _ in out] == [0, 1, 2]
    assert [r is not None for _, r, _ in out] == [True, True, False] and isinstance(out[2][2], RuntimeError)


# --------------------------------------------------------------------------- #
# issue 12, done when: a user-written flax CNN family on an .npz of 8×8×1 images, Adam, minibatches
# --------------------------------------------------------------------------- #


def test_user_cnn_family_on_npz_images_with_adam_falls_with_width_and_report_rerenders(tmp_path, capsys):
    family = tmp_path / "my_cnn.py"
    family.write_text(CNN_FAMILY)
    data = images_npz(tmp_path / "digits.npz")
    out = tmp_path / "res"
    # widths up to 16, not the docs' 32: the suite compiles without LLVM optimization, where width 32's
    # convolutions alone take ~25 s; the gap falls 0.38 -> 0.20 -> 0.064 over these three
    argv = ["sweep", "--model", f"{family}:family", "--data", str(data), "--widths", "2", "5", "16",
            "--samples", "32", "--n-test", "16", "--seeds", "0", "--optimizer", "adam", "--lr", "0.05",
            "--batch-size", "16", "--steps", "60", "--records", "4", "--out", str(out), "--quiet", "--no-report"]
    assert main(argv) == 0  # the report is rendered below, from results.jsonl alone
    records = sorted(load_results(out), key=lambda r: r["config"]["width"])
    assert [r["config"]["width"] for r in records] == [2, 5, 16]
    for rec in records:
        c, m = rec["config"], rec["metrics"]
        assert c["optimizer"] == "adam" and c["batch_size"] == 16 and len(c["data_hash"]) == 16
        assert not m["closed_form"] and np.isnan(m["test_gap"])  # Adam: no closed form, said so
    gaps = [r["metrics"]["lin_trained_test_gap"] for r in records]
    assert gaps[0] > gaps[1] > gaps[2], gaps
    (slope,) = slope_table(records, metrics=("lin_trained_test_gap",))
    assert slope["slope_mean"] < -0.3, slope

    assert {p.name for p in out.iterdir()} <= {"results.jsonl", ".ntkdyn-sweep.lock", "failures.jsonl"}
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "lin_trained_test_gap" in md and "adam has no closed form" in md
    assert (out / "discrepancy_vs_width.png").stat().st_size > 0


def test_seed_members_are_checked_before_anything_is_compiled():
    from ntkdyn.experiments.compare import compare_seeds

    x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
    members = [plain_family(5, seed=s, input_shape=(3,), out_features=1) for s in range(3)]
    kw = dict(steps=2, learning_rate=0.1)
    bad = [members[0], members[1], (plain_apply, {**members[2][1], "w2": members[2][1]["w2"] * np.nan})]
    with pytest.raises(ValueError, match=r"^members\[2\]: expected finite values"):
        compare_seeds(bad, x, y, **kw)
    other_dtype = [members[0], (plain_apply, jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), members[1][1]))]
    with pytest.raises(ValueError, match=r"^members: .* share one architecture .*members\[1\] differs"):
        compare_seeds(other_dtype, x, y, **kw)
    with pytest.raises(ValueError, match=r"^seeds\[1\]"):
        compare_seeds(members[:2], x, y, seeds=[0, -1], **kw)
    with pytest.raises(ValueError, match="^seeds: expected one seed per member"):
        compare_seeds(members, x, y, seeds=[0], **kw)
