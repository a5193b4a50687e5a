"""Model adapters and NTK-parameterized builders.

Everything downstream of this module sees a model as a pure function
``apply_fn(params, x) -> (N, K)`` together with a params pytree. This module
turns the three kinds of model users bring into that form:

* a flax ``nnx.Module``: split into ``(graphdef, Param state, rest)``; the
  ``nnx.Param`` state is the differentiable pytree, everything else (batch
  statistics, RNG counters) is held fixed;
* a flax linen module's ``apply`` (or the module itself) with its variables:
  the ``"params"`` collection is differentiable, other collections are fixed;
* a plain ``(apply_fn, params)`` pair.

All three become a :class:`Model` — a pytree whose static part is the graph
and whose leaves are the arrays it holds — so jitted code takes it as a traced
argument and its compiled programs are reused across calls.

It also builds the networks of the NTK literature, in both parameterizations:

* NTK:      ``W, b ~ N(0, 1)``,                 ``z = σ_w/√fan_in · a W + σ_b · b``
* standard: ``W ~ N(0, σ_w²/fan_in), b ~ N(0, σ_b²)``, ``z = a W + b``

Both give the same function at initialization in distribution; they differ in
how the gradient scales with width (Jacot et al. 2018; Lee et al. 2019).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ntkdyn import _validate

__all__ = [
    "ACTIVATIONS",
    "PARAMETERIZATIONS",
    "READOUTS",
    "Model",
    "as_model",
    "as_apply_fn",
    "NTKDense",
    "NTKConv",
    "MLP",
    "CNN",
    "mlp",
    "cnn",
]

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def _erf(x):
    return jax.scipy.special.erf(x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "erf": _erf,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}

PARAMETERIZATIONS = ("ntk", "standard")

READOUTS = ("flatten", "gap")


# --------------------------------------------------------------------------- #
# adapters
# --------------------------------------------------------------------------- #


def _is_linen_module(obj) -> bool:
    try:
        from flax import linen
    except ImportError:  # pragma: no cover - flax always ships linen today
        return False
    return isinstance(obj, linen.Module)


KINDS = ("plain", "nnx", "linen")


@struct.dataclass
class Model:
    """``apply_fn(params, x)`` as a pytree: the graph is static, held arrays are leaves.

    Jitted code takes a ``Model`` as an ordinary (traced) argument. Its static
    part — an NNX ``GraphDef``, a linen module, or a plain function — is hashed
    into the compiled program's cache key by value (graph / module) or identity
    (function), and the arrays it holds (NNX non-parameter state, linen
    non-``params`` collections) are traced leaves. So repeated calls on one
    model, or on another instance of the same architecture, reuse compiled code
    without any hand-made hashing.

    Attributes:
      kind: ``"plain"``, ``"nnx"`` or ``"linen"``.
      graph: the user's function, the NNX graph definition, or the linen module.
      state: arrays held fixed (``None`` for a plain function).
    """

    kind: str = struct.field(pytree_node=False)
    graph: Any = struct.field(pytree_node=False)
    state: Any = None

    def __call__(self, params, x):
        if self.kind == "nnx":
            return nnx.merge(self.graph, params, self.state)(x)
        if self.kind == "linen":
            return self.graph.apply({**self.state, "params": params}, x)
        return self.graph(params, x)


def as_model(apply_fn) -> Model:
    """A :class:`Model` for any ``apply_fn(params, x)`` (returned unchanged when it is one already)."""
    if isinstance(apply_fn, Model):
        return apply_fn
    if not callable(apply_fn):
        raise TypeError(f"apply_fn: expected a callable apply_fn(params, x), got {apply_fn!r}")
    return Model(kind="plain", graph=apply_fn, state=None)


def as_apply_fn(model, apply_fn: ApplyFn | None = None) -> tuple[Model, Any]:
    """Return ``(apply_fn, params)`` with ``apply_fn(params, x)`` a pure :class:`Model`.

    Args:
      model: a flax ``nnx.Module`` (then ``apply_fn`` must be None), or the
        params / linen variables pytree that ``apply_fn`` takes.
      apply_fn: ``apply_fn(params, x)``; a linen module or its bound ``apply``
        (then ``model`` is the linen variables dict and only its
        ``"params"`` collection is differentiated).

    Returns:
      ``(apply_fn, params)``. For an NNX module ``params`` is the
      ``nnx.Param`` state (a pytree; put trained values back with
      ``nnx.update(module, params)``); for linen it is ``variables["params"]``.
    """
    if isinstance(model, nnx.Module):
        if apply_fn is not None:
            raise TypeError(
                "apply_fn: must be None when params is a flax nnx.Module "
                f"(the module is its own apply function); got {apply_fn!r}"
            )
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return Model(kind="nnx", graph=graphdef, state=rest), params

    if apply_fn is None:
        raise TypeError(
            "apply_fn: required when params is a pytree (got params of type "
            f"{type(model).__name__}); pass apply_fn(params, x) -> (N, K), or "
            "pass a flax nnx.Module as params"
        )

    linen_module = None
    if _is_linen_module(apply_fn):
        linen_module = apply_fn
    elif _is_linen_module(getattr(apply_fn, "__self__", None)):
        linen_module = apply_fn.__self__
    if linen_module is not None:
        if not (hasattr(model, "keys") and "params" in model):
            raise TypeError(
                "params: for a linen module pass its variables dict, with a "
                f"'params' collection; got {type(model).__name__}"
            )
        rest = {k: v for k, v in model.items() if k != "params"}
        return Model(kind="linen", graph=linen_module, state=rest), model["params"]

    return as_model(apply_fn), model


# --------------------------------------------------------------------------- #
# layers
# --------------------------------------------------------------------------- #


def _init_scales(parameterization: str, fan_in: int, sigma_w: float, sigma_b: float):
    """(init std of W, init std of b, forward multiplier of W, of b)."""
    if parameterization == "ntk":
        return 1.0, 1.0, sigma_w / math.sqrt(fan_in), sigma_b
    return sigma_w / math.sqrt(fan_in), sigma_b, 1.0, 1.0


class _ScaledLayer(nnx.Module):
    """What :class:`NTKDense` and :class:`NTKConv` share: ``z = w_mult · (a ⋆ kernel) + b_mult · bias``.

    NTK parameterization draws ``kernel`` and ``bias`` from N(0, 1) and scales
    the forward pass (``w_mult = σ_w/√fan_in``, ``b_mult = σ_b``); standard
    parameterization draws them with those stds and multiplies by 1.
    """

    def _init_weights(self, kernel_shape: tuple[int, ...], fan_in: int, *, parameterization: str, sigma_w: float,
                      sigma_b: float | None, rngs: nnx.Rngs, dtype):
        """``kernel`` of ``kernel_shape``, ``bias`` of its last axis (none for ``sigma_b=None``), the multipliers."""
        _validate.choice("parameterization", parameterization, PARAMETERIZATIONS)
        dtype = dtype or jnp.result_type(float)
        # the architecture, kept static for the analytic kernels (ntkdyn.infinite)
        self.parameterization = parameterization
        self.sigma_w = float(sigma_w)
        self.sigma_b = None if sigma_b is None else float(sigma_b)
        w_std, b_std, self.w_mult, self.b_mult = _init_scales(
            parameterization, fan_in, sigma_w, sigma_b or 0.0
        )
        self.kernel = nnx.Param(w_std * jax.random.normal(rngs.params(), kernel_shape, dtype))
        self.bias = (
            None
            if sigma_b is None
            else nnx.Param(b_std * jax.random.normal(rngs.params(), kernel_shape[-1:], dtype))
        )

    def _scaled(self, z):
        """``w_mult · z + b_mult · bias`` for the unscaled product ``z = a ⋆ kernel``."""
        z = self.w_mult * z
        if self.bias is not None:
            z = z + self.b_mult * self.bias[...]
        return z


class NTKDense(_ScaledLayer):
    """Dense layer ``z = w_mult · (a @ kernel) + b_mult · bias``.

    ``kernel`` has shape (fan_in, fan_out), ``bias`` (fan_out,) — the names of
    ``nnx.Linear`` so tools that recognise dense layers recognise this one.
    ``sigma_b=None`` drops the bias.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        parameterization: str = "ntk",
        sigma_w: float = 1.0,
        sigma_b: float | None = 0.0,
        rngs: nnx.Rngs,
        dtype=None,
    ):
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features/out_features: expected positive sizes, got {in_features}, {out_features}"
            )
        self._init_weights(
            (in_features, out_features), in_features, parameterization=parameterization, sigma_w=sigma_w,
            sigma_b=sigma_b, rngs=rngs, dtype=dtype,
        )

    def __call__(self, a):
        return self._scaled(a @ self.kernel[...])


class NTKConv(_ScaledLayer):
    """2-D convolution, NHWC inputs, HWIO ``kernel``; NTK or standard scaling.

    ``fan_in = kh · kw · c_in``. ``padding`` is ``"SAME"``/``"VALID"`` or
    explicit pairs, ``strides`` an int or pair.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        *,
        strides: int | Sequence[int] = 1,
        padding="SAME",
        parameterization: str = "ntk",
        sigma_w: float = 1.0,
        sigma_b: float | None = 0.0,
        rngs: nnx.Rngs,
        dtype=None,
    ):
        ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.kernel_size = ks
        self.strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
        self.padding = padding if isinstance(padding, str) else tuple(tuple(int(p) for p in pair) for pair in padding)
        self._init_weights(
            (*ks, in_channels, out_channels), ks[0] * ks[1] * in_channels, parameterization=parameterization,
            sigma_w=sigma_w, sigma_b=sigma_b, rngs=rngs, dtype=dtype,
        )

    def __call__(self, a):
        z = jax.lax.conv_general_dilated(
            a,
            self.kernel[...],
            window_strides=self.strides,
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return self._scaled(z)


# --------------------------------------------------------------------------- #
# networks
# --------------------------------------------------------------------------- #


def _layer_options(*, activation="erf", parameterization="ntk", sigma_w=1.5, sigma_b=0.05, rngs=None, dtype=None):
    """``(activation, keywords of every NTKDense/NTKConv)`` of a builder network (defaults: :class:`MLP`'s).

    Checks ``activation``; ``rngs`` defaults to ``nnx.Rngs(0)``.
    """
    _validate.choice("activation", activation, ACTIVATIONS)
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    return activation, dict(parameterization=parameterization, sigma_w=sigma_w, sigma_b=sigma_b, rngs=rngs, dtype=dtype)


class MLP(nnx.Module):
    """Fully connected network: ``depth`` hidden layers of ``width`` units.

    ``x (N, in_features) -> (N, out_features)``; activation after every hidden
    layer, none after the readout.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int = 1,
        *,
        width: int = 512,
        depth: int = 3,
        activation: str = "erf",
        parameterization: str = "ntk",
        sigma_w: float = 1.5,
        sigma_b: float | None = 0.05,
        rngs: nnx.Rngs | None = None,
        dtype=None,
    ):
        self.activation, kw = _layer_options(
            activation=activation, parameterization=parameterization, sigma_w=sigma_w, sigma_b=sigma_b, rngs=rngs,
            dtype=dtype,
        )
        if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1:
            raise ValueError(f"width: expected an integer >= 1, got {width!r}")
        if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 0:
            raise ValueError(f"depth: expected an integer >= 0, got {depth!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.width, self.depth = int(width), int(depth)
        sizes = [in_features] + [width] * depth
        self.hidden = nnx.List([NTKDense(a, b, **kw) for a, b in zip(sizes[:-1], sizes[1:])])
        self.readout = NTKDense(sizes[-1], out_features, **kw)

    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        for layer in self.hidden:
            x = act(layer(x))
        return self.readout(x)


class CNN(nnx.Module):
    """Convolutions then a dense readout on the feature map.

    ``x (N, H, W, C) -> (N, out_features)``. ``input_shape=(H, W, C)`` fixes
    the readout's fan-in. ``readout="flatten"`` (default) reads the flattened
    feature map (fan-in ``H'·W'·C``); ``readout="gap"`` reads its global average
    over the spatial positions (fan-in ``C``).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        out_features: int = 1,
        *,
        channels: Sequence[int] = (32, 32),
        kernel_size: int = 3,
        strides: int = 1,
        padding="SAME",
        activation: str = "relu",
        parameterization: str = "ntk",
        sigma_w: float = 1.5,
        sigma_b: float | None = 0.05,
        readout: str = "flatten",
        rngs: nnx.Rngs | None = None,
        dtype=None,
    ):
        self.activation, kw = _layer_options(
            activation=activation, parameterization=parameterization, sigma_w=sigma_w, sigma_b=sigma_b, rngs=rngs,
            dtype=dtype,
        )
        _validate.choice("readout", readout, READOUTS)
        if len(input_shape) != 3:
            raise ValueError(f"input_shape: expected (H, W, C), got {tuple(input_shape)}")
        self.input_shape = tuple(int(d) for d in input_shape)
        self.out_features = int(out_features)
        self.readout_kind = readout
        convs = []
        c_in = input_shape[2]
        for c_out in channels:
            convs.append(NTKConv(c_in, c_out, kernel_size, strides=strides, padding=padding, **kw))
            c_in = c_out
        self.convs = nnx.List(convs)
        probe = jax.eval_shape(self._features, jnp.zeros((1, *input_shape), dtype or jnp.result_type(float)))
        self.readout = NTKDense(int(math.prod(probe.shape[1:])), out_features, **kw)

    def _features(self, x):
        act = ACTIVATIONS[self.activation]
        for conv in self.convs:
            x = act(conv(x))
        if self.readout_kind == "gap":
            return jnp.mean(x, axis=(1, 2))
        return x.reshape(x.shape[0], -1)

    def __call__(self, x):
        return self.readout(self._features(x))


def mlp(in_features: int, out_features: int = 1, *, seed: int = 0, **kwargs) -> tuple[ApplyFn, Any]:
    """``(apply_fn, params)`` of an :class:`MLP` built with ``nnx.Rngs(seed)``."""
    return as_apply_fn(MLP(in_features, out_features, rngs=nnx.Rngs(seed), **kwargs))


def cnn(input_shape: Sequence[int], out_features: int = 1, *, seed: int = 0, **kwargs) -> tuple[ApplyFn, Any]:
    """``(apply_fn, params)`` of a :class:`CNN` built with ``nnx.Rngs(seed)``."""
    return as_apply_fn(CNN(input_shape, out_features, rngs=nnx.Rngs(seed), **kwargs))
