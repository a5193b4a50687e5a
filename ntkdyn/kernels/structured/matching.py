"""Layer matching: which parameter leaves are dense, convolution or bias layers.

Recognition works on the flat per-example program (:mod:`.jaxpr`):

* a parameter leaf may pass through scale-orthogonal ops (reshape,
  transpose, convert, negation, multiplication by a constant scalar, adding
  unit axes) — the scale enters squared — and must then feed exactly one
  ``dot_general`` (no batch axes) or ``conv_general_dilated`` (one feature
  group) whose other operand is not derived from it; or
* pass through any chain of those ops plus broadcasts / constant multiples
  and be added to (or subtracted from) a tensor of the result's shape.

Every other leaf — shared weights, leaves under ``scan``/``cond``, normalisation
scales, anything unrecognised — goes to the fallback (per-example Jacobians).
A bias added right after a dense/conv layer is folded into that layer's site
(:func:`fold_biases`).

A model the analyser cannot read at all (it does not trace on a single
example) is an expected outcome: :class:`Unsupported`, a ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntkdyn._validate import is_concrete
from ntkdyn.kernels import costs
from ntkdyn.kernels.structured.jaxpr import Eqn, Lit, Program, flatten, replay, shapes_of, static_env
from ntkdyn.models import as_model

__all__ = ["Unsupported", "Site", "StructuredPlan", "plan", "to_positions", "chain_fn", "bias_map"]

# ops that map a parameter to c·Π(parameter), Π a permutation of entries
_ORTHO_UNARY = {"convert_element_type", "reshape", "transpose", "neg", "copy", "copy_p", "squeeze", "expand_dims"}
_ADD = {"add", "add_any", "sub"}


class Unsupported(ValueError):
    """The structured method cannot analyse this model (it does not trace on a single example)."""


@dataclasses.dataclass(frozen=True)
class Site:
    """One recognised use of a parameter leaf.

    ``eqn`` is where the zero perturbation goes (its output's cotangent is
    ``δ``); for dense/conv sites ``op_eqn`` is the contraction itself, whose
    data operand is recorded. A bias added right after a dense/conv layer is
    folded into that site (``bias``) as one more input column of constant
    value ``bias_scale``, so its Gram matrix is not computed separately.
    """

    kind: str  # "dense" | "conv" | "add"
    eqn: int
    op_eqn: int
    leaf: int
    chain: tuple  # eqn indices from the leaf up to and including op_eqn
    param_pos: int  # which input of op_eqn is the parameter
    out_shape: tuple  # shape of the perturbed value (per example)
    S: int = 1  # positions the weight is shared over
    C: int = 1  # contracted size (incl. the folded bias column)
    F: int = 1  # output features
    filter_shape: tuple = ()
    scale: float | None = None  # c with chain(W) = c·Π(W) (× output scaling up to ``eqn``)
    bias: int | None = None
    bias_scale: float = 0.0


@dataclasses.dataclass(frozen=True)
class StructuredPlan:
    """How the structured method treats each parameter leaf of one model.

    Attributes:
      program: the flat per-example program.
      sites: recognised dense / conv / bias uses (a leaf appears in at most one).
      fallback: leaf indices (``tree_leaves`` order) handled by per-example
        Jacobians.
      unused: leaves the output does not depend on (zero contribution).
      forward_flops: per-example forward FLOPs (for the cost model).
      activation_size: per-example number of intermediate values.
      num_outputs: K.
      fallback_size: number of scalar parameters in the fallback leaves.
    """

    program: Any
    sites: tuple
    fallback: tuple
    unused: tuple
    forward_flops: float
    activation_size: int
    num_outputs: int
    fallback_size: int


# --------------------------------------------------------------------------- #
# recognition
# --------------------------------------------------------------------------- #


def _is_scalar_static(a, static) -> bool:
    if isinstance(a, Lit):
        return np.ndim(a.val) == 0
    return a in static and static[a] == ()


def _broadcasts_to(shape, target) -> bool:
    """lax binary ops broadcast size-1 axes of equal-rank operands (and scalars)."""
    if len(shape) == 0:
        return True
    return len(shape) == len(target) and all(a == b or a == 1 for a, b in zip(shape, target))


def _analyse(program: Program, shapes: dict) -> tuple:
    """Sites, fallback and unused leaves of a flat program (see the module docstring)."""
    leaf_of = {lid: i for i, lid in enumerate(program.leaf_ids)}
    # id -> (leaf, scale-orthogonal so far, eqn path from the leaf)
    chain: dict[int, tuple[int, bool, tuple]] = {lid: (i, True, ()) for lid, i in leaf_of.items()}
    static: dict[int, tuple] = {cid: tuple(np.shape(c)) for cid, c in program.consts.items()}
    bad: set[int] = set()
    uses: dict[int, int] = {}
    sites: dict[int, Site] = {}
    n_sites: dict[int, int] = {}

    for i, eqn in enumerate(program.eqns):
        ins = eqn.ins
        for a in ins:
            if isinstance(a, int) and a in chain:
                uses[a] = uses.get(a, 0) + 1
        in_chain = [k for k, a in enumerate(ins) if isinstance(a, int) and a in chain]
        if not in_chain:
            if all(isinstance(a, Lit) or a in static for a in ins):
                for o, av in zip(eqn.outs, eqn.out_avals):
                    static[o] = tuple(getattr(av, "shape", ()))
            continue
        leaves = {chain[ins[k]][0] for k in in_chain}
        name = eqn.primitive.name
        others = [a for k, a in enumerate(ins) if k not in in_chain]
        others_static = all(isinstance(a, Lit) or a in static for a in others)
        site = None
        if len(in_chain) == 1 and len(eqn.outs) == 1:
            k = in_chain[0]
            leaf, ortho, path = chain[ins[k]]
            new_path = path + (i,)
            out = eqn.outs[0]
            same_size = math.prod(eqn.out_avals[0].shape) == math.prod(shapes[ins[k]])
            if others_static and name in _ORTHO_UNARY:
                chain[out] = (leaf, ortho, new_path)
                continue
            if others_static and name == "broadcast_in_dim":
                chain[out] = (leaf, ortho and same_size, new_path)
                continue
            if others_static and name == "mul":
                scalar = all(_is_scalar_static(a, static) for a in others)
                chain[out] = (leaf, ortho and scalar and same_size, new_path)
                continue
            if others_static and name == "div" and k == 0:
                chain[out] = (leaf, ortho and same_size and _is_scalar_static(ins[1], static), new_path)
                continue
            if name == "dot_general" and ortho:
                (_, _), (lb, rb) = eqn.params["dimension_numbers"]
                if not lb and not rb:
                    site = _dense_site(eqn, i, leaf, new_path, k, shapes)
            elif (
                name == "conv_general_dilated"
                and k == 1
                and ortho
                and eqn.params.get("feature_group_count", 1) == 1
                and eqn.params.get("batch_group_count", 1) == 1
            ):
                site = _conv_site(eqn, i, leaf, new_path, shapes)
            elif name in _ADD and _broadcasts_to(shapes[ins[k]], eqn.out_avals[0].shape):
                site = Site("add", i, i, leaf, new_path, k, tuple(eqn.out_avals[0].shape))
        if site is None:
            bad |= leaves
            continue
        sites[site.leaf] = site
        n_sites[site.leaf] = n_sites.get(site.leaf, 0) + 1

    # a leaf-derived value used twice (weight sharing) or returned breaks the one-path assumption
    for vid, (leaf, _, _) in chain.items():
        if uses.get(vid, 0) > 1 or vid == program.out_id:
            bad.add(leaf)
    bad |= {leaf for leaf, count in n_sites.items() if count > 1}
    used = {leaf for vid, (leaf, _, _) in chain.items() if uses.get(vid, 0) > 0}
    unused = tuple(sorted(set(leaf_of.values()) - used - bad))
    good = tuple(sites[l] for l in sorted(sites) if l not in bad)
    return good, tuple(sorted(bad)), unused


def _dense_site(eqn: Eqn, i, leaf, path, k, shapes) -> Site:
    (lc, rc), _ = eqn.params["dimension_numbers"]
    a_shape = shapes[eqn.ins[1 - k]]
    w_shape = shapes[eqn.ins[k]]
    a_contract = lc if k == 1 else rc
    w_contract = rc if k == 1 else lc
    C = math.prod(a_shape[d] for d in a_contract)
    S = math.prod(a_shape) // C
    F = math.prod(w_shape) // math.prod(w_shape[d] for d in w_contract)
    return Site("dense", i, i, leaf, path, k, tuple(eqn.out_avals[0].shape), S, C, F)


def _conv_site(eqn: Eqn, i, leaf, path, shapes) -> Site:
    dn = eqn.params["dimension_numbers"]
    w_shape = shapes[eqn.ins[1]]
    out_shape = tuple(eqn.out_avals[0].shape)
    F = w_shape[dn.rhs_spec[0]]
    C = math.prod(w_shape) // F
    S = math.prod(out_shape) // out_shape[dn.out_spec[1]]
    filter_shape = tuple(w_shape[d] for d in dn.rhs_spec[2:])
    return Site("conv", i, i, leaf, path, 1, out_shape, S, C, F, filter_shape)


# --------------------------------------------------------------------------- #
# linear maps of a site, replayed from the program
# --------------------------------------------------------------------------- #


def chain_fn(program: Program, site: Site, env: dict) -> Callable:
    """The linear map leaf ↦ the parameter operand of the site's contraction (or add)."""
    start = program.leaf_ids[site.leaf]
    return lambda leaf_value: replay(program, site.chain[:-1], start, leaf_value, env)


def bias_map(program: Program, site: Site, env: dict) -> Callable:
    """Linear map bias leaf ↦ its contribution to the add's output (incl. the add's own broadcast)."""
    chain = chain_fn(program, site, env)
    sign = -1.0 if program.eqns[site.eqn].primitive.name == "sub" and site.param_pos == 1 else 1.0
    return lambda b: sign * jnp.broadcast_to(chain(b), site.out_shape)


def _ortho_scale(program, site, env, shapes, dtype) -> float:
    """c in ``chain(W) = c·Π(W)``: the chain is linear, so ‖chain(1)‖ / ‖1‖."""
    ones = jnp.ones(shapes[program.leaf_ids[site.leaf]], dtype)
    out = np.asarray(chain_fn(program, site, env)(ones), np.float64)
    return float(np.sqrt(np.sum(np.square(out)) / ones.size))


def to_positions(value, site: Site, eqn: Eqn):
    """Rearrange a value shaped like the contraction output to (S, F)."""
    if site.kind == "dense":
        if site.param_pos == 1:  # output axes: (data free..., weight free...)
            return value.reshape(site.S, site.F)
        return value.reshape(site.F, site.S).T
    fdim = eqn.params["dimension_numbers"].out_spec[1]
    return jnp.moveaxis(value, fdim, -1).reshape(site.S, site.F)


def _consumers(program: Program) -> dict[int, list[int]]:
    consumers: dict[int, list[int]] = {}
    for i, eqn in enumerate(program.eqns):
        for a in eqn.ins:
            if isinstance(a, int):
                consumers.setdefault(a, []).append(i)
    return consumers


def _scaling_path(program: Program, start: int, consumers, add_at, static_shapes):
    """From the contraction output ``start``, the single-use chain of scalar multiplies / casts up to a bias add.

    Returns ``(path, add site)``, the add site None when the chain ends elsewhere.
    """
    cur, path = start, []
    while len(consumers.get(cur, ())) == 1 and cur != program.out_id:
        i = consumers[cur][0]
        eqn = program.eqns[i]
        if i in add_at and add_at[i].param_pos != eqn.ins.index(cur):
            return path, add_at[i]
        others = [a for a in eqn.ins if a != cur]
        scalar_mul = eqn.primitive.name == "mul" and len(others) == 1 and _is_scalar_static(others[0], static_shapes)
        if not (scalar_mul or eqn.primitive.name == "convert_element_type"):
            break
        path.append(i)
        cur = eqn.outs[0]
    return path, None


def _bias_column(program: Program, site: Site, target: Site, shapes, env, dtype) -> float | None:
    """``c_b`` when the bias reaches every position of ``site`` as the same vector ``c_b·b`` (up to sign), else None.

    Checked by replaying the bias map on the probe ``b = (1, 2, …)``.
    """
    bias_shape = shapes[program.leaf_ids[target.leaf]]
    probe = jnp.arange(1, math.prod(bias_shape) + 1, dtype=dtype).reshape(bias_shape)
    bmap = bias_map(program, target, env)(probe)
    rows = np.asarray(to_positions(bmap, site, program.eqns[site.op_eqn]), np.float64)
    row0 = rows[0]
    c_b = float(np.sum(np.abs(row0)) / np.sum(np.arange(1, row0.size + 1)))
    ok = (
        row0.size == probe.size
        and np.allclose(rows, row0[None, :], rtol=1e-6, atol=0)
        and c_b > 0
        and np.allclose(np.sort(np.abs(row0)) / c_b, np.arange(1, row0.size + 1), rtol=1e-5)
    )
    return c_b if ok else None


def fold_biases(program: Program, sites: tuple, shapes: dict, env: dict) -> tuple:
    """Fold ``y = c·(a W) + B(b)`` biases into the dense/conv site of ``a W``.

    Needs: the contraction's output reaches the add only through
    multiplications by constant scalars / dtype casts, each value used once;
    and ``B`` maps ``b`` to the same vector at every position (checked by
    replaying ``B`` on a probe). Then ``∂f/∂b = c_b Σ_s δ_s`` and the bias is
    the weight of an extra constant input column, so one Gram covers both.
    """
    consumers = _consumers(program)
    add_at = {s.eqn: s for s in sites if s.kind == "add"}
    static_shapes = {k: tuple(np.shape(v)) for k, v in env.items()}
    folded_adds: set[int] = set()
    out = []
    for site in sites:
        if site.kind == "add":
            out.append(site)
            continue
        dtype = program.eqns[site.op_eqn].out_avals[0].dtype
        site = dataclasses.replace(site, scale=_ortho_scale(program, site, env, shapes, dtype))
        y = program.eqns[site.op_eqn].outs[0]
        path, target = _scaling_path(program, y, consumers, add_at, static_shapes)
        if target is None or tuple(target.out_shape) != tuple(shapes[y]):
            out.append(site)
            continue
        c_path = np.asarray(replay(program, path, y, jnp.ones(shapes[y], dtype), env), np.float64)
        c_b = _bias_column(program, site, target, shapes, env, dtype) if np.all(c_path == c_path.flat[0]) else None
        if c_b is None:
            out.append(site)
            continue
        folded_adds.add(target.eqn)
        out.append(
            dataclasses.replace(
                site,
                eqn=target.eqn,
                out_shape=target.out_shape,
                scale=site.scale * float(c_path.flat[0]),
                bias=target.leaf,
                bias_scale=c_b,
                C=site.C + 1,
            )
        )
    return tuple(s for s in out if not (s.kind == "add" and s.eqn in folded_adds))


# --------------------------------------------------------------------------- #
# the plan
# --------------------------------------------------------------------------- #


def _trace_per_example(model, params, x):
    """``ClosedJaxpr`` of ``(state, leaves, x_i) ↦ model(params, x_i[None])[0]`` on abstract values.

    Raises :class:`Unsupported` when the model does not trace on a batch of
    one example or does not return one (1, K) row: errors the user's model
    raises while being traced (TypeError, ValueError, IndexError) become that
    expected outcome; anything else propagates.
    """
    state, model_def = jax.tree_util.tree_flatten(model)
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def per_example(state_leaves, param_leaves, xi):
        m = jax.tree_util.tree_unflatten(model_def, state_leaves)
        out = m(jax.tree_util.tree_unflatten(treedef, param_leaves), xi[None])
        if jnp.ndim(out) != 2 or jnp.shape(out)[0] != 1:
            raise Unsupported(
                "apply_fn: expected apply_fn(params, x) to return (N, K); "
                f"a batch of one example gives shape {jnp.shape(out)}"
            )
        return out[0]

    xs = jax.ShapeDtypeStruct(tuple(np.shape(x)[1:]), jnp.result_type(x))
    try:
        return jax.make_jaxpr(per_example)(costs.abstract(state), costs.abstract(leaves), xs)
    except Unsupported:
        raise
    except (TypeError, ValueError, IndexError) as err:
        raise Unsupported(
            f"apply_fn: cannot be traced on a single example, so the structured method does not apply "
            f"({type(err).__name__}: {err})"
        ) from err


def plan(apply_fn, params: Any, x) -> StructuredPlan:
    """Analyse ``apply_fn`` for inputs shaped like ``x[0]``; no model FLOPs are spent.

    Traces ``x ↦ apply_fn(params, x[None])[0]`` with :func:`jax.make_jaxpr`
    (params and held arrays abstract, so this works inside ``jit`` too) and
    returns a :class:`StructuredPlan` naming the recognised layers and the
    fallback leaves. Raises :class:`Unsupported` (a ValueError naming
    ``apply_fn``) when the model cannot be traced on one example.
    """
    model = as_model(apply_fn)
    state = jax.tree_util.tree_leaves(model)
    leaves = jax.tree_util.tree_leaves(params)
    closed = _trace_per_example(model, params, x)
    program = flatten(closed, len(state))
    shapes = shapes_of(program, [np.shape(s) for s in state], [np.shape(l) for l in leaves], np.shape(x)[1:])
    sites, fallback, unused = _analyse(program, shapes)
    if sites and all(is_concrete(c) for c in program.consts.values()):
        with jax.ensure_compile_time_eval():
            sites = fold_biases(program, sites, shapes, static_env(program))
    flops, act = costs.jaxpr_cost(closed.jaxpr)
    fallback_size = sum(math.prod(np.shape(leaves[i])) for i in fallback)
    k = int(closed.out_avals[0].shape[0])
    return StructuredPlan(program, sites, fallback, unused, flops, act, k, fallback_size)
