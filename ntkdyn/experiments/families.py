"""Model families for sweeps: how a network is built from its width.

A family is any callable::

    family(width: int, *, seed: int, input_shape: tuple[int, ...], out_features: int) -> model

returning a flax ``nnx.Module``, a linen ``(module, variables)`` pair or a plain
``(apply_fn, params)`` pair. ``width`` is whatever the family scales (hidden
units, channels); ``input_shape`` is the shape of one input (``x.shape[1:]``)
and ``out_features`` the number of outputs K of the data. A family may also
take any of the keywords in :data:`OPTIONS` (``depth``, ``activation``,
``parameterization``, ``sigma_w``, ``sigma_b``, ``dtype``): a sweep passes it
those it accepts, from the point's configuration (a family without ``dtype``
gets its floating parameters cast to the sweep's dtype).

Built in, by name (:data:`MODEL_FAMILIES`):

* ``mlp``: :class:`ntkdyn.models.MLP`, ``depth`` hidden layers of ``width``
  units (inputs of several axes are flattened first);
* ``cnn``: :class:`ntkdyn.models.CNN`, ``depth`` 3×3 convolutions of
  ``width`` channels on images ``(H, W, C)``, dense readout;
* ``resmlp``: :class:`ResidualMLP`, a pre-LayerNorm residual MLP with
  ``depth`` blocks of ``width`` units.

Your own, by import path (:func:`resolve`): ``"path/to/file.py:NAME"`` or
``"package.module:NAME"`` (in Python also the function itself, when it is
defined at the top level of a module or script). A sweep's configuration
names the family by this path plus a hash of its source — the whole file, or
the module's source file — so changed code is a new point, never a silently
reused one, and :func:`load` refuses a configuration whose source has
changed since. Code the family imports from elsewhere is not hashed.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ntkdyn import _validate, models
from ntkdyn.experiments.data import file_hash

__all__ = [
    "OPTIONS",
    "MODEL_FAMILIES",
    "ResidualMLP",
    "mlp",
    "cnn",
    "resmlp",
    "resolve",
    "load",
    "accepted_options",
    "build",
    "as_model_and_params",
]

Family = Callable[..., Any]

# the configuration fields a family may take as keywords (the built-in families take them all)
OPTIONS = ("depth", "activation", "parameterization", "sigma_w", "sigma_b", "dtype")

_FILE_MODULE_PREFIX = "_ntkdyn_family_"


# --------------------------------------------------------------------------- #
# built-in families
# --------------------------------------------------------------------------- #


class _Flatten(nnx.Module):
    """``inner(x.reshape(N, −1))``: a flat-input network on inputs of any shape."""

    def __init__(self, inner: nnx.Module):
        self.inner = inner

    def __call__(self, x):
        return self.inner(x.reshape(x.shape[0], -1))


class ResidualMLP(nnx.Module):
    """Pre-LayerNorm residual MLP.

    ``x (N, ...)`` is flattened to ``(N, d)``, then::

        h₀ = W_in x
        h_{l+1} = h_l + (1/√depth) · W_l² φ(W_l¹ LN(h_l)),   l = 0 … depth−1
        f(x) = W_out LN(h_depth)

    Every ``W`` is an :class:`ntkdyn.models.NTKDense` (NTK or standard
    parameterization, ``σ_w``, ``σ_b``); ``LN`` is ``nnx.LayerNorm`` with a
    learned scale (init 1) and bias (init 0), ε = 1e-6. The 1/√depth branch
    scale keeps the residual stream's variance O(1) in depth.

    ``width`` (≥ 1) and ``depth`` (≥ 1 blocks) are its own; ``mlp_options`` are
    every other keyword of :class:`ntkdyn.models.MLP` (``activation``,
    ``parameterization``, ``sigma_w``, ``sigma_b``, ``rngs``, ``dtype``), with
    the same meaning and defaults (an unknown keyword raises TypeError).
    """

    def __init__(self, in_features: int, out_features: int = 1, *, width: int = 256, depth: int = 2, **mlp_options):
        activation, kw = models._layer_options(**mlp_options)
        width = _validate.count("width", width, 1)
        depth = _validate.count("depth", depth, 1)
        rngs = kw["rngs"]
        dtype = jnp.dtype(kw["dtype"]) if kw["dtype"] is not None else jnp.result_type(float)
        kw["dtype"] = dtype

        def norm():
            return nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, param_dtype=dtype, rngs=rngs)

        self.activation = activation
        self.branch_scale = 1.0 / math.sqrt(depth)
        self.embed = models.NTKDense(int(in_features), width, **kw)
        self.norms = nnx.List([norm() for _ in range(depth)])
        self.inner = nnx.List([models.NTKDense(width, width, **kw) for _ in range(depth)])
        self.outer = nnx.List([models.NTKDense(width, width, **kw) for _ in range(depth)])
        self.final_norm = norm()
        self.readout = models.NTKDense(width, int(out_features), **kw)

    def __call__(self, x):
        act = models.ACTIVATIONS[self.activation]
        h = self.embed(x.reshape(x.shape[0], -1))
        for ln, inner, outer in zip(self.norms, self.inner, self.outer):
            h = h + self.branch_scale * outer(act(inner(ln(h))))
        return self.readout(self.final_norm(h))


def mlp(width: int, *, seed: int, input_shape: tuple[int, ...], out_features: int, depth: int = 2,
        **options) -> nnx.Module:
    """:class:`ntkdyn.models.MLP` with ``depth`` hidden layers of ``width`` units, ``nnx.Rngs(seed)``.

    ``options``: the MLP's ``activation``, ``parameterization``, ``sigma_w``,
    ``sigma_b``, ``dtype``. Flat inputs ``(d,)`` give exactly the sweep's
    historical MLP; inputs of several axes are flattened to
    ``prod(input_shape)`` features first.
    """
    net = models.MLP(int(math.prod(input_shape)), out_features, width=width, depth=depth, rngs=nnx.Rngs(seed),
                     **options)
    return net if len(input_shape) == 1 else _Flatten(net)


def cnn(width: int, *, seed: int, input_shape: tuple[int, ...], out_features: int, depth: int = 2,
        **options) -> nnx.Module:
    """:class:`ntkdyn.models.CNN`: ``depth`` 3×3 SAME convolutions of ``width`` channels, dense readout.

    ``options``: the CNN's ``activation``, ``parameterization``, ``sigma_w``,
    ``sigma_b``, ``dtype``. Needs image inputs ``input_shape = (H, W, C)``
    (ValueError naming ``input_shape`` otherwise).
    """
    if len(input_shape) != 3:
        raise ValueError(
            f"input_shape: the cnn family needs images (H, W, C), got inputs of shape {tuple(input_shape)}; "
            "use the mlp or resmlp family for flat inputs"
        )
    return models.CNN(input_shape, out_features, channels=(width,) * depth, rngs=nnx.Rngs(seed), **options)


def resmlp(width: int, *, seed: int, input_shape: tuple[int, ...], out_features: int, depth: int = 2,
           **options) -> nnx.Module:
    """:class:`ResidualMLP` of ``depth`` blocks of ``width`` units, ``nnx.Rngs(seed)`` (``options`` as :func:`mlp`)."""
    return ResidualMLP(int(math.prod(input_shape)), out_features, width=width, depth=depth, rngs=nnx.Rngs(seed),
                       **options)


# model families by name; a user family is named by its import path instead (see resolve)
MODEL_FAMILIES: dict[str, Family] = {"mlp": mlp, "cnn": cnn, "resmlp": resmlp}


# --------------------------------------------------------------------------- #
# import paths and source hashes
# --------------------------------------------------------------------------- #


def _split_spec(spec: str) -> tuple[str, str]:
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name or not all(part.isidentifier() for part in name.split(".")):
        raise ValueError(
            f"model: expected a built-in family ({', '.join(MODEL_FAMILIES)}), 'path/to/file.py:NAME' or "
            f"'package.module:NAME', got {spec!r}"
        )
    return where, name


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def _attribute(module, name: str, spec: str):
    obj = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model: {spec!r}: {getattr(module, '__name__', module)!s} has no attribute {name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model: {spec!r} is not callable (got {type(obj).__name__})")
    return obj


def _file_module(path: Path, digest: str):
    """Import the file ``path`` (whose content hash is ``digest``) once per content, as its own module."""
    module_name = f"{_FILE_MODULE_PREFIX}{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"model: cannot import {str(path)!r} as Python source")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses (linen modules) look their module up while it runs
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise ValueError(f"model: importing {str(path)!r} failed: {type(err).__name__}: {err}") from err
    return module


def _import(spec: str) -> tuple[Family, str, str]:
    """``(family, canonical spec, source hash)`` of an import path (not a built-in name)."""
    where, name = _split_spec(spec)
    if _is_file(where):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"model: no such file {where!r} (from {spec!r})")
        digest = file_hash(path)
        return _attribute(_file_module(path, digest), name, spec), f"{path}:{name}", digest
    try:
        module = importlib.import_module(where)
    except ImportError as err:
        raise ValueError(f"model: cannot import module {where!r} (from {spec!r}): {err}") from err
    source = getattr(module, "__file__", None)
    if not source or not Path(source).is_file():
        raise ValueError(f"model: module {where!r} has no source file to hash (from {spec!r})")
    return _attribute(module, name, spec), f"{where}:{name}", file_hash(source)


def _spec_of(family: Family) -> str:
    """The import path of a family given as a Python object."""
    for name, builtin in MODEL_FAMILIES.items():
        if family is builtin:
            return name
    module_name = getattr(family, "__module__", None)
    qualname = getattr(family, "__qualname__", None)
    if not module_name or not qualname or "<" in qualname:
        raise ValueError(
            f"model: a sweep re-imports its family by name, so it must be defined at the top level of a module "
            f"or script; got {qualname or family!r}"
        )
    module = sys.modules.get(module_name)
    if module_name == "__main__" or module_name.startswith(_FILE_MODULE_PREFIX):
        source = getattr(module, "__file__", None)
        if not source:
            raise ValueError(f"model: {qualname!r} is defined in an interactive session; put it in a file")
        return f"{Path(source).resolve()}:{qualname}"
    return f"{module_name}:{qualname}"


def resolve(family: str | Family) -> tuple[str, str]:
    """``(spec, source_hash)`` identifying a family in a configuration.

    ``family`` is a built-in name (hash ``""``: versioned with the library),
    ``"path/to/file.py:NAME"`` (spec with the absolute path; hash of the
    file), ``"package.module:NAME"`` (hash of the module's source file), or
    the function itself. The family is imported to check it exists and
    takes the family arguments. ValueError naming ``model`` otherwise.
    """
    if callable(family) and not isinstance(family, str):
        family = _spec_of(family)
    if not isinstance(family, str) or not family:
        raise ValueError(f"model: expected a family name or import path, got {family!r}")
    if family in MODEL_FAMILIES:
        return family, ""
    fn, spec, digest = _import(family)
    _check_signature(fn, spec)
    return spec, digest


def load(spec: str, source_hash: str = "") -> Family:
    """The family a configuration names; ValueError when its source no longer hashes to ``source_hash``."""
    if spec in MODEL_FAMILIES:
        return MODEL_FAMILIES[spec]
    fn, _, digest = _import(spec)
    if source_hash and digest != source_hash:
        raise ValueError(
            f"model: the source of {spec!r} changed since this point was configured (hash {digest}, "
            f"recorded {source_hash}); changed code is a new point: run the sweep again to configure it"
        )
    return fn


def _check_signature(fn: Family, spec: str) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C callable: trust it
    try:
        sig.bind(1, seed=0, input_shape=(1,), out_features=1)
    except TypeError as err:
        raise ValueError(
            f"model: {spec!r} must take family(width, *, seed, input_shape, out_features), got {fn.__name__}{sig} "
            f"({err})"
        ) from None


def accepted_options(family: Family) -> frozenset[str]:
    """The :data:`OPTIONS` keywords ``family`` takes (all of them when it takes ``**kwargs``)."""
    try:
        params = inspect.signature(family).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return frozenset(OPTIONS)
    named = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = {p.name for p in params if p.kind in named}
    return frozenset(OPTIONS) & names


# --------------------------------------------------------------------------- #
# building one network
# --------------------------------------------------------------------------- #


def as_model_and_params(made: Any, where: str = "family") -> tuple[models.Model, Any]:
    """``(Model, params)`` from a family's result: nnx.Module, (linen module, variables) or (apply_fn, params)."""
    if isinstance(made, nnx.Module):
        return models.as_apply_fn(made)
    if isinstance(made, (tuple, list)) and len(made) == 2 and callable(made[0]):
        return models.as_apply_fn(made[1], made[0])
    raise TypeError(
        f"model: {where} returned {type(made).__name__}; expected an nnx.Module, a linen (module, variables) "
        "pair or an (apply_fn, params) pair"
    )


def build(
    family: Family,
    width: int,
    *,
    seed: int,
    input_shape: tuple[int, ...],
    out_features: int,
    options: dict | None = None,
) -> tuple[models.Model, Any]:
    """Call ``family`` and return ``(Model, params)``.

    ``options`` (keys from :data:`OPTIONS`) are passed when the family takes
    them; a ``dtype`` it does not take is applied by casting the floating
    parameter leaves.
    """
    options = dict(options or {})
    accepted = accepted_options(family)
    made = family(int(width), seed=int(seed), input_shape=tuple(int(d) for d in input_shape),
                  out_features=int(out_features), **{k: v for k, v in options.items() if k in accepted})
    model, params = as_model_and_params(made, getattr(family, "__name__", "family"))
    dtype = options.get("dtype")
    if dtype is not None and "dtype" not in accepted:
        dtype = jnp.dtype(dtype)
        params = jax.tree_util.tree_map(
            lambda p: p.astype(dtype) if jnp.issubdtype(jnp.result_type(p), jnp.floating) else p, params
        )
    return model, params
