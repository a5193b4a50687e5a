"""Infinite-width kernels of the ntkdyn builders and the predictions of infinitely wide ensembles.

As every hidden width (channel count) of :class:`ntkdyn.models.MLP` or
:class:`ntkdyn.models.CNN` goes to infinity, the outputs at initialization
become a Gaussian process with the NNGP kernel ``K`` and the empirical NTK
becomes the deterministic kernel ``Θ`` (Neal 1996; Lee et al. 2018; Jacot et
al. 2018; Novak et al. 2019; Arora et al. 2019). Both are ``∝ I_K`` over the K
outputs, so this module works with (N1, N2) matrices.

**Recursion.** Let ``A(x, x') = E[φ(u) φ(u')]`` and
``Ȧ(x, x') = E[φ'(u) φ'(u')]`` with ``(u, u') ~ N(0, [[K(x,x), K(x,x')], [K(x,x'), K(x',x')]])``
taken at the previous layer (for the first layer ``A = x·x'/d``, the per-channel
mean of ``x_c x'_c`` per pair of pixels for a CNN). Every affine layer
(dense, convolution, readout) of fan-in ``F`` maps

    K ← σ_w² op(A) + σ_b²
    Θ ← c_w op(A) + c_b + σ_w² op(Ȧ ⊙ Θ)           (no last term at the first layer)

with ``op`` the identity for a dense layer, the window average
``(1/(kh·kw)) Σ_δ A[s·p + δ − pad, s·p' + δ − pad]`` for a convolution (zero
padding contributes zero), ``mean_p A[p, p]`` for the flatten readout and
``mean_{p,p'} A[p, p']`` for the global-average-pool readout. Only the
same-position pairs ``(p, p)`` are needed unless the readout pools, so the
flatten path tracks (N1, N2, H, W) and the pooling path (N1, N2, H, W, H, W).

**Parameterization.** NTK (``z = σ_w/√F · a W + σ_b b``, ``W, b ~ N(0, 1)``):
``c_w = σ_w²``, ``c_b = σ_b²``; the result does not depend on the widths.
Standard (``z = a W + b``, ``W ~ N(0, σ_w²/F)``, ``b ~ N(0, σ_b²)``): the NNGP is
the same, but ``∂z/∂W = a`` carries no ``1/√F``, so each layer's weight term is
multiplied by ``F/σ_w²`` and its bias term by ``1/σ_b²``: ``c_w = F``, ``c_b = 1``
(the bias is trained even when ``σ_b = 0``). ``F`` is the instance's fan-in
(``width`` for hidden dense layers), so **the standard-parameterization NTK has
no finite infinite-width limit** — it grows linearly with the width. What is
returned is the leading-order expected NTK *at the instance's widths* (the
convention of neural-tangents' ``parameterization="standard"``; Sohl-Dickstein et
al. 2020), which the empirical NTK of that network approaches with relative
fluctuations ``O(width^−½)``; gradient descent on it needs ``η = O(1/width)``.

**Activations.** Closed forms for relu (arc-cosine, Cho & Saul 2009), erf
(arcsine, Williams 1997) and linear; every other activation of
:data:`ntkdyn.models.ACTIVATIONS` by Mehler's Hermite series, whose
coefficients are 1-D Gauss-weighted quadratures (:func:`moments`).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ntkdyn import _validate, models, spectral

__all__ = [
    "Kernels",
    "Architecture",
    "Layer",
    "EnsemblePrediction",
    "architecture",
    "kernels",
    "moments",
    "ensemble",
    "predict",
    "kernel_error",
    "inside_band",
    "CLOSED_FORMS",
    "HERMITE_TERMS",
]

CLOSED_FORMS = ("relu", "erf", "linear")
HERMITE_TERMS = 512
_GRID_STEP, _GRID_RANGE = 0.04, 12.0  # the 1-D grid of the Hermite coefficients: e^{−z²/4} < 1e-15 outside
_MEMORY_BUDGET = 2**24  # elements of the largest intermediate array of one kernel tile
GETS = ("ntk", "nngp")


# --------------------------------------------------------------------------- #
# results
# --------------------------------------------------------------------------- #


@struct.dataclass
class Kernels:
    """The infinite-width kernels of a network (each ``⊗ I_K`` over its K outputs).

    Attributes:
      nngp: ``K(x1, x2)``, (N1, N2): the covariance of the outputs at initialization.
      ntk: ``Θ(x1, x2)``, (N1, N2): the limit of the (output-traced) empirical NTK.
    """

    nngp: jax.Array
    ntk: jax.Array


@struct.dataclass
class EnsemblePrediction:
    """Mean and covariance over initializations of an infinitely wide network trained by GD.

    Over the K outputs the outputs are independent with the same covariance,
    so a covariance is one (N, N) matrix per time.

    Attributes:
      t: the times, () or (T,), in steps.
      mean_train: E[f_t(X)], (N, K), or (T, N, K) for 1-D t.
      mean_test: E[f_t(x*)], (Nt, K) or (T, Nt, K); None without test inputs.
      cov_train: Cov[f_t(X)], (N, N) or (T, N, N); None when ``covariance=False``.
      cov_test: Cov[f_t(x*)], (Nt, Nt) or (T, Nt, Nt); None without test inputs or covariance.
      get: ``"ntk"`` (every layer trained) or ``"nngp"`` (the readout alone).
    """

    t: jax.Array
    mean_train: jax.Array
    mean_test: jax.Array | None
    cov_train: jax.Array | None
    cov_test: jax.Array | None
    get: str = struct.field(pytree_node=False, default="ntk")

    @property
    def std_train(self) -> jax.Array | None:
        """``√diag(cov_train)``, (N,) or (T, N): the standard deviation of each training output."""
        return None if self.cov_train is None else _diag_std(self.cov_train)

    @property
    def std_test(self) -> jax.Array | None:
        """``√diag(cov_test)``, (Nt,) or (T, Nt)."""
        return None if self.cov_test is None else _diag_std(self.cov_test)


def _diag_std(cov: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.maximum(jnp.diagonal(cov, axis1=-2, axis2=-1), 0.0))


# --------------------------------------------------------------------------- #
# the architecture, read from a builder instance
# --------------------------------------------------------------------------- #


class Layer(NamedTuple):
    """One affine layer of the recursion (static).

    ``op``: ``"dense"``, ``"conv"``, ``"flatten"`` (dense readout of the
    flattened feature map) or ``"gap"`` (dense readout of the spatial mean).
    ``nngp_w, nngp_b``: σ_w², σ_b² (0 without a bias); ``ntk_w, ntk_b``: the
    weight and bias coefficients of Θ (σ_w², σ_b² in NTK parameterization;
    the fan-in and 1 in standard parameterization — so in NTK
    parameterization networks that differ only in width share one
    :class:`Architecture` and one compiled program). ``window``, ``strides``,
    ``pads`` describe a convolution (``()`` otherwise).
    """

    op: str
    nngp_w: float
    nngp_b: float
    ntk_w: float
    ntk_b: float
    window: tuple = ()
    strides: tuple = ()
    pads: tuple = ()


@struct.dataclass
class Architecture:
    """What the analytic kernels need to know about a network; static (a pytree without leaves).

    Built by :func:`architecture`. Jitted code takes it as an ordinary
    argument: its fields are part of the compiled program's cache key, by value.

    Attributes:
      kind: ``"MLP"`` or ``"CNN"``.
      input_shape: the shape of one input, ``(d,)`` or ``(H, W, C)``.
      activation: a key of :data:`ntkdyn.models.ACTIVATIONS`.
      layers: the affine layers, first to readout (:class:`Layer`).
      pairs: whether every pair of spatial positions is tracked (pooling readout).
      parameterization: ``"ntk"``, ``"standard"`` (or ``"mixed"`` when layers differ).
    """

    kind: str = struct.field(pytree_node=False)
    input_shape: tuple = struct.field(pytree_node=False)
    activation: str = struct.field(pytree_node=False)
    layers: tuple = struct.field(pytree_node=False)
    pairs: bool = struct.field(pytree_node=False)
    parameterization: str = struct.field(pytree_node=False)


def _layer_coefficients(layer, name: str) -> tuple[dict, int]:
    for attr in ("parameterization", "sigma_w", "sigma_b", "kernel"):
        if not hasattr(layer, attr):
            raise TypeError(
                f"model: layer {name} ({type(layer).__name__}) is not an ntkdyn.models.NTKDense/NTKConv "
                f"with its architecture attributes; the analytic kernels support only the ntkdyn builders"
            )
    if layer.parameterization not in models.PARAMETERIZATIONS:
        raise ValueError(
            f"model: parameterization {layer.parameterization!r} of layer {name} is not supported by the "
            f"analytic kernels; supported: {models.PARAMETERIZATIONS}"
        )
    fan_in = int(math.prod(layer.kernel.shape[:-1]))
    has_bias = getattr(layer, "bias", None) is not None
    sw2 = float(layer.sigma_w) ** 2
    sb2 = float(layer.sigma_b) ** 2 if has_bias and layer.sigma_b is not None else 0.0
    if layer.parameterization == "ntk":
        ntk_w, ntk_b = sw2, sb2
    else:
        ntk_w, ntk_b = float(fan_in), (1.0 if has_bias else 0.0)
    return dict(nngp_w=sw2, nngp_b=sb2, ntk_w=ntk_w, ntk_b=ntk_b), fan_in


def _check_activation(activation) -> str:
    if activation not in models.ACTIVATIONS:
        raise ValueError(
            f"model: activation {activation!r} is not supported by the analytic kernels; supported: "
            f"{tuple(models.ACTIVATIONS)} (closed forms for {CLOSED_FORMS}, a Hermite series for the rest)"
        )
    return activation


def _parameterization(layers) -> str:
    kinds = {layer.parameterization for layer in layers}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _conv_layer(conv, spatial: tuple, name: str) -> tuple[Layer, tuple]:
    window = tuple(int(k) for k in conv.kernel_size)
    strides = tuple(int(s) for s in conv.strides)
    if isinstance(conv.padding, str):
        try:
            pads = tuple(tuple(int(p) for p in pair) for pair in
                         jax.lax.padtype_to_pads(spatial, window, strides, conv.padding))
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"model: padding {conv.padding!r} of layer {name} is not supported: {err}") from err
    else:
        pads = tuple(tuple(int(p) for p in pair) for pair in conv.padding)
        if len(pads) != 2 or any(len(p) != 2 or min(p) < 0 for p in pads):
            raise ValueError(
                f"model: padding {conv.padding!r} of layer {name} is not supported by the analytic kernels "
                "(expected 'SAME', 'VALID' or two non-negative (low, high) pairs)"
            )
    out = tuple((n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip(spatial, pads, window, strides))
    layer = Layer(op="conv", window=window, strides=strides, pads=pads, **_layer_coefficients(conv, name)[0])
    return layer, out


def architecture(model) -> Architecture:
    """The :class:`Architecture` of an :class:`ntkdyn.models.MLP` or :class:`ntkdyn.models.CNN` instance.

    Only static attributes and weight *shapes* are read, so an abstract module
    works as well, e.g. ``nnx.eval_shape(lambda: models.MLP(3, width=4096))``
    (no weights drawn). The width of the instance does not enter in NTK
    parameterization; in standard parameterization the layers' fan-ins do
    (see the module notes).

    Raises:
      TypeError: ``model`` is not one of the builders (a plain function, an
        adapter :class:`ntkdyn.models.Model`, another module).
      ValueError: an activation, padding or parameterization the analytic
        path does not support.
    """
    if isinstance(model, Architecture):
        return model
    if isinstance(model, models.MLP):
        activation = _check_activation(model.activation)
        dense = [*model.hidden, model.readout]
        layers = tuple(
            Layer(op="dense", **_layer_coefficients(layer, f"hidden[{i}]" if i < len(dense) - 1 else "readout")[0])
            for i, layer in enumerate(dense)
        )
        return Architecture(kind="MLP", input_shape=(int(model.in_features),), activation=activation,
                            layers=layers, pairs=False, parameterization=_parameterization(dense))
    if isinstance(model, models.CNN):
        activation = _check_activation(model.activation)
        readout = getattr(model, "readout_kind", "flatten")
        if readout not in models.READOUTS:
            raise ValueError(f"model: readout {readout!r} is not supported; supported: {models.READOUTS}")
        spatial = tuple(model.input_shape[:2])
        layers = []
        for i, conv in enumerate(model.convs):
            layer, spatial = _conv_layer(conv, spatial, f"convs[{i}]")
            if min(spatial) < 1:
                raise ValueError(f"model: layer convs[{i}] leaves no spatial positions ({spatial})")
            layers.append(layer)
        coefficients, fan_in = _layer_coefficients(model.readout, "readout")
        head = Layer(op=readout, **coefficients)
        channels = model.convs[-1].kernel.shape[-1] if len(model.convs) else model.input_shape[2]
        expected = channels * (math.prod(spatial) if readout == "flatten" else 1)
        if fan_in != expected:  # the builder and this reading disagree: refuse rather than guess
            raise ValueError(f"model: the readout's fan-in {fan_in} does not match the feature map "
                             f"{spatial} x {channels} read from the convolutions")
        layers.append(head)
        return Architecture(kind="CNN", input_shape=tuple(int(d) for d in model.input_shape),
                            activation=activation, layers=tuple(layers), pairs=readout == "gap",
                            parameterization=_parameterization([*model.convs, model.readout]))
    if isinstance(model, models.Model):
        what = "an ntkdyn.models.Model adapter (an apply function)"
    else:
        what = f"{type(model).__module__}.{type(model).__name__}"
    raise TypeError(
        f"model: the analytic kernels support ntkdyn.models.MLP and ntkdyn.models.CNN instances "
        f"(pass the nnx module itself), got {what}"
    )


# --------------------------------------------------------------------------- #
# Gaussian expectations of the activation
# --------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=8)
def _hermite_basis(terms: int) -> tuple[np.ndarray, np.ndarray]:
    """The grid ``z`` (Q,) and the matrix ``B`` (Q, terms) with ``φ(√v z) @ B = (c_n(v))_n``.

    ``c_n(v) = E[φ(√v ζ) He_n(ζ)] / √n! = ∫ φ(√v z) h_n(z) √N(z) dz`` with the
    orthonormal Hermite functions ``h_n = He_n √N / √n!`` (stable three-term
    recurrence), by the midpoint rule on ``[−12, 12]`` with step 0.04 (float64;
    cast to the working dtype by the caller).
    """
    # midpoints of a grid symmetric about 0: a kink or jump of φ at 0 (relu) costs O(step²), not O(step)
    z = np.arange(-_GRID_RANGE + _GRID_STEP / 2, _GRID_RANGE, _GRID_STEP)
    h = np.zeros((terms, z.size))
    h[0] = (2 * np.pi) ** -0.25 * np.exp(-0.25 * z**2)
    if terms > 1:
        h[1] = z * h[0]
    for n in range(1, terms - 1):
        h[n + 1] = (z * h[n] - math.sqrt(n) * h[n - 1]) / math.sqrt(n + 1)
    root_density = (2 * np.pi) ** -0.25 * np.exp(-0.25 * z**2)
    return z, (_GRID_STEP * h * root_density).T


def _coefficients(activation: str, v: jax.Array, terms: int) -> tuple[jax.Array, jax.Array]:
    """Hermite coefficients (…, terms) of ``φ(√v ·)`` and ``φ'(√v ·)`` for every variance in ``v``."""
    z, basis = _hermite_basis(terms)
    u = jnp.sqrt(v)[..., None] * jnp.asarray(z, v.dtype)
    f, df = jax.jvp(models.ACTIVATIONS[activation], (u,), (jnp.ones_like(u),))
    basis = jnp.asarray(basis, v.dtype)
    return f @ basis, df @ basis


def _series(rho: jax.Array, a1, a2, d1, d2) -> tuple[jax.Array, jax.Array]:
    """``Σ_n ρⁿ a1_n a2_n`` and ``Σ_n ρⁿ d1_n d2_n`` (Mehler), by Horner's rule from the last term.

    The coefficient arrays broadcast against ``rho.shape + (terms,)``; memory is a
    few arrays of ``rho``'s shape whatever the number of terms.
    """
    xs = tuple(jnp.moveaxis(a, -1, 0)[::-1] for a in (a1, a2, d1, d2))

    def step(carry, coef):
        s, sd = carry
        c1, c2, e1, e2 = coef
        return (s * rho + c1 * c2, sd * rho + e1 * e2), None

    zero = jnp.zeros(rho.shape, rho.dtype)
    (s, sd), _ = jax.lax.scan(step, (zero, zero), xs)
    return s, sd


def _correlation(c, v1, v2):
    s = jnp.sqrt(v1 * v2)
    return jnp.clip(c / jnp.where(s > 0, s, 1.0), -1.0, 1.0)


def _relu(c, v1, v2):
    s = jnp.sqrt(v1 * v2)
    rho = _correlation(c, v1, v2)
    theta = jnp.arccos(rho)
    a = s / (2 * jnp.pi) * (jnp.sqrt(1.0 - rho**2) + (jnp.pi - theta) * rho)
    # relu'(0) = 0 in JAX: an input of zero variance never passes a gradient
    adot = jnp.where(s > 0, (jnp.pi - theta) / (2 * jnp.pi), 0.0)
    return a, adot


def _erf(c, v1, v2):
    d = (1.0 + 2.0 * v1) * (1.0 + 2.0 * v2)
    a = (2.0 / jnp.pi) * jnp.arcsin(jnp.clip(2.0 * c / jnp.sqrt(d), -1.0, 1.0))
    adot = (4.0 / jnp.pi) / jnp.sqrt(jnp.maximum(d - 4.0 * c**2, 1.0))  # d − 4c² ≥ 1 + 2v1 + 2v2 for a PSD pair
    return a, adot


def _linear(c, v1, v2):
    return c, jnp.ones_like(c)


_CLOSED = {"relu": _relu, "erf": _erf, "linear": _linear}


def _self_moment(activation: str, v, coefficients=None):
    """``E[φ(u)²]``, ``u ~ N(0, v)``: closed form, or ``Σ_n c_n(v)²`` (the series at ρ = 1)."""
    if activation == "relu":
        return 0.5 * v
    if activation == "erf":
        return (2.0 / jnp.pi) * jnp.arcsin(2.0 * v / (1.0 + 2.0 * v))
    if activation == "linear":
        return v
    return jnp.sum(coefficients * coefficients, axis=-1)


def moments(activation: str, c, v1, v2, *, method: str = "auto",
            hermite_terms: int = HERMITE_TERMS) -> tuple[jax.Array, jax.Array]:
    """``(E[φ(u)φ(v)], E[φ'(u)φ'(v)])`` for ``(u, v) ~ N(0, [[v1, c], [c, v2]])``.

    Closed forms (``method="closed"``, the default for relu, erf and linear):

    * relu: ``√(v1 v2)/(2π) · (sin θ + (π − θ) cos θ)`` and ``(π − θ)/(2π)``,
      ``θ = arccos(c/√(v1 v2))`` (0 at zero variance: JAX's relu'(0) = 0);
    * erf: ``(2/π) arcsin(2c/√((1 + 2v1)(1 + 2v2)))`` and
      ``(4/π) / √((1 + 2v1)(1 + 2v2) − 4c²)``;
    * linear: ``c`` and 1.

    Hermite series (``method="series"``, the default for every other
    activation): with ``ρ = c/√(v1 v2)``, Mehler's formula

        E[φ(u)φ(v)] = Σ_n ρⁿ c_n(v1) c_n(v2),   c_n(v) = E[φ(√v ζ) He_n(ζ)] / √n!,  ζ ~ N(0, 1)

    (and the same with φ'), truncated after ``hermite_terms`` terms; each
    coefficient is a 1-D Gauss-weighted integral of the orthonormal Hermite
    functions, by the midpoint rule (step 0.04 on [−12, 12]). The cost is
    ``hermite_terms`` multiply-adds per pair of inputs (and one 1-D quadrature
    per input), against ``Q²`` activation calls for a 2-D product rule. The
    truncated series is a PSD kernel, exact at ρ = 0 and least accurate at
    |ρ| → 1; the coefficients of an analytic φ decay like ``exp(−d√(2n))``,
    ``d`` the distance of φ(√v ·)'s nearest complex singularity (``π/(2√v)`` for
    tanh). Measured with 512 terms against a 4000² trapezoid reference, worst
    over ρ, relative to ``E[φ(u)²]`` resp. ``E[φ'(u)²]``: tanh ≤ 1e-13 up to
    variance 3, 1e-10 / 3e-8 at 10, 8e-7 / 1e-4 at 30; sigmoid and gelu are
    more accurate (``benchmarks/infinite_convergence.py quadrature``).

    Args:
      activation: a key of :data:`ntkdyn.models.ACTIVATIONS`.
      c, v1, v2: covariance and the two variances (broadcast together).
      method: ``"auto"``, ``"closed"`` (relu, erf, linear only) or ``"series"``.
      hermite_terms: terms of the series.
    """
    _check_activation(activation)
    _validate.choice("method", method, ("auto", "closed", "series"))
    terms = _validate.count("hermite_terms", hermite_terms, 1)
    c, v1, v2 = (_validate.float_array(name, a) for name, a in (("c", c), ("v1", v1), ("v2", v2)))
    dtype = jnp.result_type(c, v1, v2)
    c, v1, v2 = (a.astype(dtype) for a in (c, v1, v2))
    shape = jnp.broadcast_shapes(c.shape, v1.shape, v2.shape)
    if method == "closed" and activation not in _CLOSED:
        raise ValueError(f"method: no closed form for activation {activation!r}; closed forms: {CLOSED_FORMS}")
    if method == "closed" or (method == "auto" and activation in _CLOSED):
        a, adot = _CLOSED[activation](c, v1, v2)
    else:
        a1, d1 = _coefficients(activation, v1, terms)
        a2, d2 = _coefficients(activation, v2, terms)
        a, adot = _series(jnp.broadcast_to(_correlation(c, v1, v2), shape), a1, a2, d1, d2)
    return jnp.broadcast_to(a, shape), jnp.broadcast_to(adot, shape)


# --------------------------------------------------------------------------- #
# the layer recursion
# --------------------------------------------------------------------------- #


def _window(a: jax.Array, layer: Layer, sets: int) -> jax.Array:
    """Window average of a convolution over the trailing ``sets`` pairs of spatial axes, shifted together."""
    (kh, kw), (sh, sw) = layer.window, layer.strides
    lead = a.ndim - 2 * sets
    a = jnp.pad(a, [(0, 0)] * lead + list(layer.pads) * sets)
    h, w = a.shape[lead], a.shape[lead + 1]
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = None
    for di in range(kh):
        for dj in range(kw):
            rows = slice(di, di + sh * (ho - 1) + 1, sh)
            cols = slice(dj, dj + sw * (wo - 1) + 1, sw)
            part = a[(slice(None),) * lead + (rows, cols) * sets]
            out = part if out is None else out + part
    return out / (kh * kw)


def _op(a: jax.Array, layer: Layer, sets: int) -> jax.Array:
    if layer.op == "conv":
        return _window(a, layer, sets)
    if layer.op == "flatten":
        return jnp.mean(a, axis=(-2, -1))
    if layer.op == "gap":
        return jnp.mean(a, axis=(-4, -3, -2, -1))
    return a


def _input_moment(arch: Architecture, x1: jax.Array, x2: jax.Array) -> jax.Array:
    """``A⁰``: ``x1·x2/d`` (MLP) or the per-channel mean of ``x1[p]·x2[p']`` (CNN)."""
    if arch.kind == "MLP":
        return x1 @ x2.T / x1.shape[-1]
    if arch.pairs:
        return jnp.einsum("ihwc,jklc->ijhwkl", x1, x2) / x1.shape[-1]
    return jnp.einsum("ihwc,jhwc->ijhw", x1, x2) / x1.shape[-1]


def _per_input(arch: Architecture, x: jax.Array, terms: int) -> tuple:
    """For every hidden layer: ``K(x, x)`` at the same-position pairs, (b, *spatial), and for
    activations without a closed form the Hermite coefficients of φ and φ' there, (b, *spatial, terms)."""
    a = jnp.mean(x * x, axis=-1)
    out = []
    for layer in arch.layers[:-1]:
        v = layer.nngp_w * _op(a, layer, 1) + layer.nngp_b
        coef = None if arch.activation in _CLOSED else _coefficients(arch.activation, v, terms)
        out.append((v, coef))
        a = _self_moment(arch.activation, v, None if coef is None else coef[0])
    return tuple(out)


def _spread(v1: jax.Array, v2: jax.Array, pairs: bool, trailing: int = 0) -> tuple[jax.Array, jax.Array]:
    """Broadcast (b1, *sp, …) and (b2, *sp, …) per-input arrays against the (b1, b2, *sp[, *sp], …) cross arrays.

    ``trailing`` axes (the series terms) stay last.
    """
    sp = v1.ndim - 1 - trailing
    if pairs:
        one = (1,) * sp
        return (v1.reshape(v1.shape[:1] + (1,) + v1.shape[1:1 + sp] + one + v1.shape[1 + sp:]),
                v2.reshape((1,) + v2.shape[:1] + one + v2.shape[1:]))
    return v1[:, None], v2[None]


def _tile(arch: Architecture, x1, x2, per1, per2):
    """NNGP and NTK of one (b1, b2) tile."""
    a = _input_moment(arch, x1, x2)
    sets = 2 if arch.pairs else 1
    dtheta = None
    for i, layer in enumerate(arch.layers):
        op_a = _op(a, layer, sets)
        k = layer.nngp_w * op_a + layer.nngp_b
        theta = layer.ntk_w * op_a + layer.ntk_b
        if dtheta is not None:
            theta = theta + layer.nngp_w * _op(dtheta, layer, sets)
        if i == len(arch.layers) - 1:
            return k, theta
        (var1, coef1), (var2, coef2) = per1[i], per2[i]
        v1, v2 = _spread(var1, var2, arch.pairs)
        if coef1 is None:
            a, adot = _CLOSED[arch.activation](k, v1, v2)
        else:
            a1, a2 = _spread(coef1[0], coef2[0], arch.pairs, trailing=1)
            d1, d2 = _spread(coef1[1], coef2[1], arch.pairs, trailing=1)
            a, adot = _series(_correlation(k, v1, v2), a1, a2, d1, d2)
        dtheta = adot * theta
    raise AssertionError("an architecture has at least its readout layer")


def _auto_tile(arch: Architecture, n: int, terms: int) -> int:
    """The largest tile whose biggest arrays stay under the memory budget (elements).

    Per pair of inputs: a few cross arrays of ``spatial`` (flatten) or
    ``spatial²`` (pooling) entries; per input, without a closed form: the
    activation on the coefficient grid and the coefficients, ``spatial × (Q + 4·terms)``.
    """
    spatial = math.prod(arch.input_shape[:-1]) if arch.kind == "CNN" else 1
    per_pair = 8 * (spatial**2 if arch.pairs else spatial)
    tile = math.isqrt(max(1, _MEMORY_BUDGET // per_pair))
    if arch.activation not in _CLOSED:
        grid = _hermite_basis(terms)[0].size
        tile = min(tile, _MEMORY_BUDGET // (spatial * (grid + 4 * terms) * max(1, len(arch.layers) - 1)))
    return int(max(1, min(n, tile)))


def _blocks(a: jax.Array, tile: int) -> jax.Array:
    """(n, ...) → (⌈n/tile⌉, tile, ...), padding by repeating the last row."""
    n = a.shape[0]
    m = -(-n // tile)
    a = jnp.pad(a, [(0, m * tile - n)] + [(0, 0)] * (a.ndim - 1), mode="edge")
    return a.reshape((m, tile) + a.shape[1:])


@functools.partial(jax.jit, static_argnames=("tile", "terms", "same"))
def _kernels(arch: Architecture, x1: jax.Array, x2: jax.Array, *, tile: int, terms: int, same: bool):
    n1, n2 = x1.shape[0], x2.shape[0]
    b1, b2 = min(tile, n1), min(tile, n2)
    xb1, xb2 = _blocks(x1, b1), _blocks(x2, b2)
    per_fn = lambda xb: _per_input(arch, xb, terms)
    pb1 = jax.lax.map(per_fn, xb1)
    pb2 = pb1 if same else jax.lax.map(per_fn, xb2)
    m1, m2 = xb1.shape[0], xb2.shape[0]
    pick = lambda tree, i: jax.tree_util.tree_map(lambda a: a[i], tree)
    if m1 == 1 and m2 == 1:
        k, theta = _tile(arch, xb1[0], xb2[0], pick(pb1, 0), pick(pb2, 0))
    else:
        def row(i):
            def col(j):
                return _tile(arch, xb1[i], xb2[j], pick(pb1, i), pick(pb2, j))
            return jax.lax.map(col, jnp.arange(m2))

        k, theta = jax.lax.map(row, jnp.arange(m1))
        k = k.transpose(0, 2, 1, 3).reshape(m1 * b1, m2 * b2)
        theta = theta.transpose(0, 2, 1, 3).reshape(m1 * b1, m2 * b2)
    k, theta = k[:n1, :n2], theta[:n1, :n2]
    if same:  # exactly symmetric (x1 and x2 enter in different roles in floating point)
        k, theta = 0.5 * (k + k.T), 0.5 * (theta + theta.T)
    return Kernels(nngp=k, ntk=theta)


def _inputs(name: str, x, arch: Architecture) -> jax.Array:
    x = _validate.batch(name, x)
    if tuple(x.shape[1:]) != tuple(arch.input_shape):
        raise ValueError(
            f"{name}: expected inputs of shape (N, {', '.join(map(str, arch.input_shape))}) for this "
            f"{arch.kind}, got {tuple(x.shape)}"
        )
    return x


def kernels(model, x1: jax.Array, x2: jax.Array | None = None, *, tile_size: int | None = None,
            hermite_terms: int = HERMITE_TERMS) -> Kernels:
    """The infinite-width NNGP and NTK of a builder network, (N1, N2) each.

    Recursion and parameterizations in the module notes; activations in
    :func:`moments`. Computed in the inputs' dtype (float64 when x64 is
    enabled and the inputs are float64), in tiles of ``tile_size × tile_size``
    input pairs (default: the largest tile whose biggest intermediate array
    stays under 2²⁴ elements), inside ``jax.jit`` (the architecture is a
    static pytree, so another instance of the same architecture reuses the
    compiled program). Traceable: callable inside ``jax.jit``/``vmap`` with
    traced inputs.

    Args:
      model: an :class:`ntkdyn.models.MLP` or :class:`ntkdyn.models.CNN`
        instance (or its :class:`Architecture`).
      x1: (N1, d) or (N1, H, W, C) inputs, as the model takes them.
      x2: (N2, ...) inputs; default ``x1`` (then the kernels are exactly symmetric).
      tile_size: input pairs per tile side, or None for the memory-bounded default.
      hermite_terms: terms of the Hermite series for activations without a closed form.

    Returns:
      :class:`Kernels` with ``nngp`` and ``ntk``, (N1, N2).

    Raises:
      TypeError: ``model`` is not an MLP/CNN builder instance.
      ValueError: unsupported activation/padding, inputs of the wrong shape,
        non-finite inputs, a bad ``tile_size``.
    """
    arch = architecture(model)
    x1 = _inputs("x1", x1, arch)
    same = x2 is None
    x2 = x1 if same else _inputs("x2", x2, arch)
    dtype = jnp.result_type(x1, x2)
    terms = _validate.count("hermite_terms", hermite_terms, 1)
    if tile_size is None:
        tile = _auto_tile(arch, max(x1.shape[0], x2.shape[0]), terms)
    else:
        tile = _validate.count("tile_size", tile_size)
    return _kernels(arch, x1.astype(dtype), x2.astype(dtype), tile=tile, terms=terms, same=same)


# --------------------------------------------------------------------------- #
# ensemble predictions
# --------------------------------------------------------------------------- #


def _check_kernel(name: str, k, rows: int, cols: int) -> jax.Array:
    k = _validate.float_array(name, k)
    if k.shape != (rows, cols):
        raise ValueError(f"{name}: expected shape {(rows, cols)}, got {tuple(k.shape)}")
    _validate.finite(name, k)
    return k


@functools.partial(jax.jit, static_argnames=("time", "covariance", "n"))
def _evaluate(spec, prior_tt, y, times, lr, diag_reg, dyn_st, prior_st, prior_ss, *, time: str,
              covariance: bool, n: int, kernels_ok=True):
    """Means and covariances at every time from one spectrum of the (regularized) dynamics kernel."""
    lam, vecs, null = spec.eigenvalues, spec.eigenvectors, spec.null
    t = times[:, None]
    e = jnp.where(null, 1.0, spectral.decay(lam, t, learning_rate=lr, n=n, time=time))  # (T, N)
    fitted = jnp.where(null, 0.0, spectral.decay_complement(lam, t, learning_rate=lr, n=n, time=time))
    g = jnp.where(null, 0.0, spectral.gain(lam, t, learning_rate=lr, n=n, time=time))
    coef = vecs.T @ y  # (N, K)
    mean_train = jnp.einsum("im,tm,mk->tik", vecs, fitted, coef)
    mean_test = cov_train = cov_test = None
    if dyn_st is not None:
        a = dyn_st @ vecs  # Θ(x*, X) V
        mean_test = jnp.einsum("sm,tm,mk->tsk", a, g, coef)
    if covariance:
        prior_eig = vecs.T @ prior_tt @ vecs  # Vᵀ K V
        ev = vecs[None] * e[:, None, :]  # V diag(e): E(t) = V diag(e) Vᵀ
        cov_train = jnp.einsum("tim,mn,tjn->tij", ev, prior_eig, ev)
        cov_train = 0.5 * (cov_train + jnp.swapaxes(cov_train, 1, 2))
        if dyn_st is not None:
            # M = Θ(x*, X) V diag(g) Vᵀ;  Cov = K** − M K(X, x*) − K(x*, X) Mᵀ + M K Mᵀ
            ag = a[None] * g[:, None, :]  # (T, Nt, N)
            cross = jnp.einsum("tsm,mr->tsr", ag, vecs.T @ prior_st.T)
            quad = jnp.einsum("tsm,mn,trn->tsr", ag, prior_eig, ag)
            cov_test = prior_ss[None] - cross - jnp.swapaxes(cross, 1, 2) + quad
            cov_test = 0.5 * (cov_test + jnp.swapaxes(cov_test, 1, 2))
    ok = jnp.isfinite(lr) & (lr > 0) & jnp.isfinite(diag_reg) & (diag_reg >= 0) & kernels_ok
    ok_t = ok & (times >= 0)
    out = (mean_train, mean_test, cov_train, cov_test)
    return _validate.nan_unless(ok_t[:, None, None], out)


def _check_discrete(spec, lr, n: int, times, time: str) -> None:
    """Eager: fractional steps past n/λ_max are undefined (ValueError); past 2n/λ_max descent diverges (warning)."""
    if time != "discrete" or not _validate.is_concrete((spec.eigenvalues, lr, times)):
        return
    lam_max = float(spec.eigenvalues[-1])
    if lam_max <= 0:
        return
    lr = float(lr)
    values = np.asarray(times)
    if lr * lam_max / n > 1:
        fractional = np.isfinite(values) & (values != np.round(values))
        if np.any(fractional):
            raise ValueError(
                f"t: time='discrete' with learning_rate={lr:.6g} above n/λ_max={n / lam_max:.6g} makes "
                f"(1 − ηλ/n) negative, so only whole step counts are defined; got t={values[fractional][0]}"
            )
    limit = 2.0 * n / lam_max
    if lr > limit * (1.0 + 8.0 * float(jnp.finfo(spec.eigenvalues.dtype).eps)):
        from ntkdyn.dynamics import UnstableLearningRateWarning

        warnings.warn(
            f"learning_rate={lr:.6g} is above 2n/λ_max = {limit:.6g} of the infinite-width kernel: "
            "discrete gradient descent diverges",
            UnstableLearningRateWarning,
            stacklevel=3,
        )


def ensemble(
    k_train_train: Kernels,
    y: jax.Array,
    t,
    *,
    k_test_train: Kernels | None = None,
    nngp_test_test: jax.Array | None = None,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    time: str = "continuous",
    covariance: bool = True,
    get: str = "ntk",
) -> EnsemblePrediction:
    """Mean and covariance of ``f_t`` over initializations, from the infinite-width kernels.

    Outputs at initialization are ``f₀ ~ GP(0, K)`` (K = NNGP), independent
    over the K outputs, and training is linear in function space with the
    deterministic kernel ``Θ`` (``get="ntk"``: every layer trained, Lee et al.
    2019 Eq. 13–16) or ``K`` itself (``get="nngp"``: only the readout trained;
    in NTK parameterization the readout's own NTK is exactly K). With the
    dynamics kernel ``D`` (``Θ`` or ``K``) regularized as ``D + reg·I``,
    ``reg = diag_reg · mean(diag D)``, ``n = N·K``, ``E(t) = exp(−ηDt/n)``
    (continuous) or ``(I − ηD/n)^t`` (discrete), and ``M_t = D(x*, X) D⁻¹(I − E(t))``:

    * ``mean_train = (I − E(t)) Y``,  ``mean_test = M_t Y``;
    * ``cov_train = E(t) K E(t)``;
    * ``cov_test = K(x*, x*) − M_t K(X, x*) − K(x*, X) M_tᵀ + M_t K M_tᵀ``.

    ``K`` in the covariances is never regularized: the result is exactly the
    mean and covariance over initializations of ntkdyn's own linearized
    prediction (:func:`ntkdyn.function_space` with the same ``diag_reg``) of a
    network whose kernels are these. At t = 0 the covariances are the NNGP
    kernels; at t = ∞ (``jnp.inf``) with ``get="nngp"`` and ``diag_reg = 0``
    they are the exact GP posterior ``K** − K(x*, X) K⁻¹ K(X, x*)`` with mean
    ``K(x*, X) K⁻¹ Y`` (neural-tangents adds the regularizer to the prior
    covariance too when ``diag_reg > 0``; here it is part of the dynamics only).
    ``D⁻¹(I − E)`` and ``I − E`` come from one eigendecomposition and the
    stable spectral functions of :mod:`ntkdyn.spectral` (eigenvalues below
    ``N·K·eps·λ_max`` are exact zeros, so singular kernels and t = ∞ give the
    pseudo-inverse limit, never NaN).

    Args:
      k_train_train: :class:`Kernels` on the training inputs, (N, N) each.
      y: targets (N, K).
      t: time in steps; scalar or 1-D; ``jnp.inf`` allowed.
      k_test_train: :class:`Kernels` between test and training inputs, (Nt, N).
      nngp_test_test: ``K(x*, x*)``, (Nt, Nt); needed for ``cov_test``.
      learning_rate: η > 0.
      diag_reg: relative regularizer ≥ 0 of the dynamics kernel.
      time: ``"continuous"`` or ``"discrete"``.
      covariance: whether to compute the covariances.
      get: ``"ntk"`` or ``"nngp"``.

    Returns:
      :class:`EnsemblePrediction` (a leading T axis for 1-D t).

    Raises:
      ValueError: a kernel that is not symmetric (``nngp_test_test``) or not
        symmetric positive semi-definite (both training kernels), or a bad
        hyper-parameter, each naming its argument. Under ``jax.jit`` the
        same conditions make every output NaN instead.
    """
    if not isinstance(k_train_train, Kernels):
        raise TypeError(f"k_train_train: expected an ntkdyn.infinite.Kernels, got {type(k_train_train).__name__}")
    n_train = jnp.shape(k_train_train.ntk)[0] if jnp.ndim(k_train_train.ntk) else 0
    nngp_tt = _check_kernel("k_train_train.nngp", k_train_train.nngp, n_train, n_train)
    ntk_tt = _check_kernel("k_train_train.ntk", k_train_train.ntk, n_train, n_train)
    for name, k in (("k_train_train.nngp", nngp_tt), ("k_train_train.ntk", ntk_tt)):
        _validate.symmetric_psd(name, k, what="kernel")
    nngp_st = ntk_st = nngp_ss = None
    if k_test_train is not None:
        if not isinstance(k_test_train, Kernels):
            raise TypeError(f"k_test_train: expected an ntkdyn.infinite.Kernels, got {type(k_test_train).__name__}")
        n_test = jnp.shape(k_test_train.ntk)[0] if jnp.ndim(k_test_train.ntk) == 2 else 0
        nngp_st = _check_kernel("k_test_train.nngp", k_test_train.nngp, n_test, n_train)
        ntk_st = _check_kernel("k_test_train.ntk", k_test_train.ntk, n_test, n_train)
        if covariance:
            if nngp_test_test is None:
                raise ValueError("nngp_test_test: required for the test covariance (or pass covariance=False)")
            nngp_ss = _check_kernel("nngp_test_test", nngp_test_test, n_test, n_test)
            _validate.symmetric("nngp_test_test", nngp_ss)
    options = _ensemble_options(learning_rate=learning_rate, diag_reg=diag_reg, time=time, covariance=covariance,
                                get=get)
    return _ensemble(nngp_tt, ntk_tt, y, t, nngp_st, ntk_st, nngp_ss, **options)


def _ensemble_options(*, learning_rate=1.0, diag_reg=0.0, time="continuous", covariance=True, get="ntk") -> dict:
    """:func:`ensemble`'s options (its defaults), ``get``, ``time`` and ``covariance`` checked."""
    _validate.choice("get", get, GETS)
    _validate.choice("time", time, spectral.TIMES)
    if not isinstance(covariance, (bool, np.bool_)):
        raise TypeError(f"covariance: expected a bool, got {covariance!r}")
    return dict(learning_rate=learning_rate, diag_reg=diag_reg, time=time, covariance=covariance, get=get)


def _ensemble(nngp_tt, ntk_tt, y, t, nngp_st, ntk_st, nngp_ss, *, learning_rate, diag_reg, time, covariance, get):
    """:func:`ensemble` on checked kernels (the analytic ones are PSD by construction) and checked options."""
    n_train = nngp_tt.shape[0]
    y = _validate.matrix("y", y, rows=n_train)
    times, scalar = _validate.times(t)
    lr = _validate.positive_scalar("learning_rate", learning_rate)
    reg = _validate.nonnegative_scalar("diag_reg", diag_reg)
    dtype = jnp.result_type(nngp_tt, ntk_tt, y)
    cast = lambda a: None if a is None else jnp.asarray(a, dtype)
    nngp_tt, ntk_tt, y, nngp_st, ntk_st, nngp_ss = map(cast, (nngp_tt, ntk_tt, y, nngp_st, ntk_st, nngp_ss))
    dyn_tt, dyn_st = (ntk_tt, ntk_st) if get == "ntk" else (nngp_tt, nngp_st)
    n = n_train * y.shape[1]
    spec = spectral.spectrum(dyn_tt, diag_reg=jnp.asarray(reg, dtype), rcond=spectral.default_rcond(n, dtype))
    _check_discrete(spec, lr, n, times, time)
    # under jit the eager kernel checks are skipped: an asymmetric or indefinite traced kernel gives NaN
    kernels_ok = (_validate.traced_symmetric_psd(nngp_tt) & _validate.traced_symmetric_psd(ntk_tt)
                  & _validate.traced_symmetric_psd(nngp_ss, psd=False))
    mean_train, mean_test, cov_train, cov_test = _evaluate(
        spec, nngp_tt, y, times.astype(dtype), jnp.asarray(lr, dtype), jnp.asarray(reg, dtype),
        dyn_st, nngp_st, nngp_ss, time=time, covariance=bool(covariance), n=n, kernels_ok=kernels_ok,
    )
    drop = (lambda a: a if a is None else a[0]) if scalar else (lambda a: a)
    return EnsemblePrediction(t=times[0] if scalar else times, mean_train=drop(mean_train),
                              mean_test=drop(mean_test), cov_train=drop(cov_train), cov_test=drop(cov_test),
                              get=get)


def predict(
    model,
    x: jax.Array,
    y: jax.Array,
    t,
    *,
    x_test: jax.Array | None = None,
    tile_size: int | None = None,
    **ensemble_options,
) -> EnsemblePrediction:
    """Mean and covariance over initializations of an infinitely wide ``model`` trained by GD on MSE.

    The analytic :func:`kernels` of ``model`` on ``x`` (and ``x_test``), then
    :func:`ensemble` (formulas there): the same quantity as neural-tangents'
    ``gradient_descent_mse_ensemble(kernel_fn, x, y, learning_rate, diag_reg)(t, x_test, get, compute_cov=True)``
    in ntkdyn's conventions — loss ``1/(2NK)‖f − Y‖²``, t in steps (both clocks),
    ``n = N·K``, relative ``diag_reg``.

    Args:
      model: an :class:`ntkdyn.models.MLP` or :class:`ntkdyn.models.CNN` instance.
      x: training inputs (N, ...); y: targets (N, K) (any K: the kernels are ``∝ I_K``).
      t: time in steps, scalar or 1-D; ``jnp.inf`` for the converged limit.
      x_test: optional test inputs (Nt, ...).
      tile_size: as in :func:`kernels`.
      **ensemble_options: every keyword of :func:`ensemble` but the kernels
        (``learning_rate``, ``diag_reg``, ``time``, ``covariance``, ``get``),
        same meaning and defaults, forwarded unchanged (an unknown keyword
        raises TypeError before any kernel is computed).

    Returns:
      :class:`EnsemblePrediction`.
    """
    arch = architecture(model)
    x = _inputs("x", x, arch)
    y = _validate.matrix("y", y, rows=x.shape[0])
    options = _ensemble_options(**ensemble_options)
    k_tt = kernels(arch, x, tile_size=tile_size)
    nngp_st = ntk_st = nngp_ss = None
    if x_test is not None:
        x_test = _inputs("x_test", x_test, arch)
        k_st = kernels(arch, x_test, x, tile_size=tile_size)
        nngp_st, ntk_st = k_st.nngp, k_st.ntk
        if options["covariance"]:
            nngp_ss = kernels(arch, x_test, tile_size=tile_size).nngp
    return _ensemble(k_tt.nngp, k_tt.ntk, y, t, nngp_st, ntk_st, nngp_ss, **options)


# --------------------------------------------------------------------------- #
# finite vs infinite: helpers for sweeps and reports
# --------------------------------------------------------------------------- #


def kernel_error(model, x: jax.Array, *, ntk: jax.Array | None = None,
                 ntk_infinite: jax.Array | None = None) -> jax.Array:
    """``‖Θ_emp(θ₀) − Θ_∞‖_F / ‖Θ_∞‖_F`` of a builder network on inputs ``x``.

    ``Θ_emp`` is the network's empirical NTK at its current weights — computed
    with :func:`ntkdyn.empirical_ntk` (output-traced) unless given as ``ntk``,
    output-traced (N, N) or full (N, N, K, K); a full kernel is compared with
    ``Θ_∞ ⊗ I_K``. ``Θ_∞`` is :func:`kernels` ``(model, x).ntk`` unless given
    as ``ntk_infinite`` (to reuse it across the seeds of one architecture).
    Expected to fall as ``width^−½`` per seed in NTK parameterization.
    """
    arch = architecture(model)
    x = _inputs("x", x, arch)
    n = x.shape[0]
    if ntk_infinite is None:
        ntk_infinite = kernels(arch, x).ntk
    inf = _check_kernel("ntk_infinite", ntk_infinite, n, n)
    if ntk is None:
        from ntkdyn.kernels import empirical_ntk  # the empirical-NTK layer, imported where used

        apply_fn, params = models.as_apply_fn(model)
        ntk = empirical_ntk(apply_fn, params, x, trace_outputs=True)
    emp = _validate.float_array("ntk", ntk)
    if emp.ndim == 2:
        _check_kernel("ntk", emp, n, n)
        return jnp.linalg.norm(emp - inf) / jnp.linalg.norm(inf)
    if emp.ndim != 4 or emp.shape[:2] != (n, n) or emp.shape[2] != emp.shape[3]:
        raise ValueError(f"ntk: expected shape ({n}, {n}) or ({n}, {n}, K, K), got {tuple(emp.shape)}")
    outputs = emp.shape[2]
    diff = emp - inf[:, :, None, None] * jnp.eye(outputs, dtype=emp.dtype)
    return jnp.linalg.norm(diff.ravel()) / (math.sqrt(outputs) * jnp.linalg.norm(inf))


def inside_band(mean: jax.Array, cov: jax.Array, values: jax.Array, *, num_std: float = 2.0) -> jax.Array:
    """Whether each output lies within ``mean ± num_std·σ``, ``σ = √diag(cov)``.

    Args:
      mean: (..., N, K), e.g. :attr:`EnsemblePrediction.mean_test`.
      cov: (..., N, N), the matching covariance (the same for every output).
      values: (..., N, K), e.g. a real network's outputs at the same times.
      num_std: the band's half-width in standard deviations (> 0).

    Returns:
      bool array of ``values``' shape (``jnp.mean`` of it is the fraction inside).
    """
    mean, cov, values = (_validate.float_array(name, a) for name, a in
                         (("mean", mean), ("cov", cov), ("values", values)))
    _validate.positive_scalar("num_std", num_std)
    if values.shape != mean.shape:
        raise ValueError(f"values: expected shape {tuple(mean.shape)} like mean, got {tuple(values.shape)}")
    if mean.ndim < 2 or cov.shape != mean.shape[:-1] + mean.shape[-2:-1]:
        raise ValueError(f"cov: expected shape {tuple(mean.shape[:-1] + mean.shape[-2:-1])} for mean of shape "
                         f"{tuple(mean.shape)}, got {tuple(cov.shape)}")
    return jnp.abs(values - mean) <= num_std * _diag_std(cov)[..., None]
