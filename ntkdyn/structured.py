"""Structured empirical NTK: dense, convolution and bias layers without per-example gradients.

For a layer ``y = a W`` seen by one example (``a`` of shape (S, C) after
moving the contracted axes last, ``S`` the positions the weight is shared
over — 1 for a dense layer, the output pixels for a convolution), with
output cotangents ``δ_k = ∂f_k/∂y`` of shape (S, F), the weight's
contribution to the kernel is::

    Θ_W(x, x')[k, l] = ⟨aᵀ δ_k, a'ᵀ δ'_l⟩ = Σ_{s,s'} (a_s · a'_s') (δ_{k,s} · δ'_{l,s'})

so for a dense layer (S = 1) it is the product of two Gram matrices,
``(a·a')(δ_k·δ'_l)``, and no per-example gradient ``aᵀδ_k`` (size C·F) is
ever formed. Convolutions use the same identity over patches (``a`` = the
im2col patches, C = kh·kw·c_in); when S² is large the per-example weight
gradient ``aᵀδ_k`` is cheaper and is contracted instead (chosen per layer by
FLOP count). A bias ``y = z + B(b)`` (``B`` a broadcast, any linear map of
``b`` alone) contributes ``⟨Bᵀδ_k, Bᵀδ'_l⟩``.

All ``δ`` come from one reverse pass per output ``k`` (K in all), taken with
respect to zero-valued perturbations added to each recognised layer's output.

Recognition works on the jaxpr of the per-example function
``x ↦ apply_fn(params, x[None])[0]`` (public ``jax.make_jaxpr`` /
``jax.extend.core`` surfaces only; nested ``jit`` calls are inlined):

* a parameter leaf may pass through scale-orthogonal ops (reshape,
  transpose, convert, negation, multiplication by a constant scalar, adding
  unit axes) — the scale enters squared — and must then feed exactly one
  ``dot_general`` (no batch axes) or ``conv_general_dilated`` (one feature
  group) whose other operand is not derived from it; or
* pass through any chain of those ops plus broadcasts / constant multiples
  and be added to (or subtracted from) a tensor of the result's shape.

Every other leaf — shared weights, leaves under ``scan``/``cond``, normalisation
scales, anything unrecognised — goes to the fallback: per-example Jacobians
of just those leaves, taken in the same reverse passes, contracted exactly.
The sum over leaves is exact either way.

Assumption (as for every tiled method): row ``i`` of ``apply_fn(params, x)``
depends only on ``x[i]`` (no batch statistics, no attention across the
batch). The kernel is that of the per-example function.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from ntkdyn import ntk as _ntk
from ntkdyn._checks import is_concrete

__all__ = ["StructuredPlan", "plan", "structured_tile", "structured_cost"]


# --------------------------------------------------------------------------- #
# a flat program: the per-example jaxpr with nested jit calls inlined
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class _Lit:
    val: Any


@dataclasses.dataclass(frozen=True)
class _Eqn:
    primitive: Any
    params: dict
    ins: tuple  # ints (value ids) or _Lit
    outs: tuple  # ints
    out_avals: tuple


@dataclasses.dataclass(frozen=True)
class _Program:
    eqns: tuple
    leaf_ids: tuple
    x_id: int
    consts: dict  # id -> value
    out_id: Any  # int or _Lit


_CALL_PRIMITIVES = ("jit", "pjit", "closed_call", "core_call")


def _flatten(closed) -> _Program:
    counter = iter(range(1 << 62))
    eqns: list[_Eqn] = []
    consts: dict[int, Any] = {}

    def atom(env, v):
        if isinstance(v, jex_core.Literal):
            return _Lit(v.val)
        return env[v]

    def walk(jaxpr, env):
        for eqn in jaxpr.eqns:
            ins = tuple(atom(env, v) for v in eqn.invars)
            inner = eqn.params.get("jaxpr") if eqn.primitive.name in _CALL_PRIMITIVES else None
            if isinstance(inner, jex_core.ClosedJaxpr):
                ienv = {}
                for cv, c in zip(inner.jaxpr.constvars, inner.consts):
                    ienv[cv] = cid = next(counter)
                    consts[cid] = c
                for iv, a in zip(inner.jaxpr.invars, ins):
                    ienv[iv] = a
                walk(inner.jaxpr, ienv)
                for ov, iv in zip(eqn.outvars, inner.jaxpr.outvars):
                    env[ov] = atom(ienv, iv)
                continue
            outs = []
            for ov in eqn.outvars:
                oid = next(counter)
                if not isinstance(ov, jex_core.DropVar):
                    env[ov] = oid
                outs.append(oid)
            eqns.append(
                _Eqn(eqn.primitive, dict(eqn.params), ins, tuple(outs), tuple(ov.aval for ov in eqn.outvars))
            )

    env = {}
    for cv, c in zip(closed.jaxpr.constvars, closed.consts):
        env[cv] = cid = next(counter)
        consts[cid] = c
    ids = []
    for iv in closed.jaxpr.invars:
        env[iv] = vid = next(counter)
        ids.append(vid)
    walk(closed.jaxpr, env)
    (out,) = closed.jaxpr.outvars
    return _Program(tuple(eqns), tuple(ids[:-1]), ids[-1], consts, atom(env, out))


def _bind(eqn: _Eqn, vals):
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = ()
    if isinstance(params, tuple):  # older JAX returned (subfuns, params)
        subfuns, params = params
    out = eqn.primitive.bind(*subfuns, *vals, **params)
    return out if eqn.primitive.multiple_results else (out,)


# --------------------------------------------------------------------------- #
# recognition
# --------------------------------------------------------------------------- #

# ops that map a parameter to c·Π(parameter), Π a permutation of entries
# symmetric tiles are split into row blocks of about this many examples
_SYMMETRIC_BLOCK = 256
_MAX_SYMMETRIC_BLOCKS = 8

_ORTHO_UNARY = {"convert_element_type", "reshape", "transpose", "neg", "copy", "copy_p", "squeeze", "expand_dims"}
_ADD = {"add", "add_any", "sub"}



@dataclasses.dataclass(frozen=True)
class _Site:
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


def _is_scalar_static(a, static) -> bool:
    if isinstance(a, _Lit):
        return np.ndim(a.val) == 0
    return a in static and static[a] == ()


def _broadcasts_to(shape, target) -> bool:
    """lax binary ops broadcast size-1 axes of equal-rank operands (and scalars)."""
    if len(shape) == 0:
        return True
    return len(shape) == len(target) and all(a == b or a == 1 for a, b in zip(shape, target))


def _analyse(program: _Program, shapes: dict) -> tuple:
    """Sites, fallback and unused leaves of a flat program (see the module docstring)."""
    leaf_of = {lid: i for i, lid in enumerate(program.leaf_ids)}
    # id -> (leaf, scale-orthogonal so far, eqn path from the leaf)
    chain: dict[int, tuple[int, bool, tuple]] = {lid: (i, True, ()) for lid, i in leaf_of.items()}
    static: dict[int, tuple] = {cid: tuple(np.shape(c)) for cid, c in program.consts.items()}
    bad: set[int] = set()
    uses: dict[int, int] = {}
    sites: dict[int, _Site] = {}
    n_sites: dict[int, int] = {}

    for i, eqn in enumerate(program.eqns):
        ins = eqn.ins
        for a in ins:
            if isinstance(a, int) and a in chain:
                uses[a] = uses.get(a, 0) + 1
        in_chain = [k for k, a in enumerate(ins) if isinstance(a, int) and a in chain]
        if not in_chain:
            if all(isinstance(a, _Lit) or a in static for a in ins):
                for o, av in zip(eqn.outs, eqn.out_avals):
                    static[o] = tuple(getattr(av, "shape", ()))
            continue
        leaves = {chain[ins[k]][0] for k in in_chain}
        name = eqn.primitive.name
        others = [a for k, a in enumerate(ins) if k not in in_chain]
        others_static = all(isinstance(a, _Lit) or a in static for a in others)
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
                site = _Site("add", i, i, leaf, new_path, k, tuple(eqn.out_avals[0].shape))
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


def _dense_site(eqn, i, leaf, path, k, shapes) -> _Site:
    (lc, rc), _ = eqn.params["dimension_numbers"]
    a_shape = shapes[eqn.ins[1 - k]]
    w_shape = shapes[eqn.ins[k]]
    a_contract = lc if k == 1 else rc
    w_contract = rc if k == 1 else lc
    C = math.prod(a_shape[d] for d in a_contract)
    S = math.prod(a_shape) // C
    F = math.prod(w_shape) // math.prod(w_shape[d] for d in w_contract)
    return _Site("dense", i, i, leaf, path, k, tuple(eqn.out_avals[0].shape), S, C, F)


def _conv_site(eqn, i, leaf, path, shapes) -> _Site:
    dn = eqn.params["dimension_numbers"]
    w_shape = shapes[eqn.ins[1]]
    out_shape = tuple(eqn.out_avals[0].shape)
    F = w_shape[dn.rhs_spec[0]]
    C = math.prod(w_shape) // F
    S = math.prod(out_shape) // out_shape[dn.out_spec[1]]
    filter_shape = tuple(w_shape[d] for d in dn.rhs_spec[2:])
    return _Site("conv", i, i, leaf, path, 1, out_shape, S, C, F, filter_shape)


def _shapes_of(program: _Program, leaf_shapes, x_shape) -> dict:
    shapes = {cid: tuple(np.shape(c)) for cid, c in program.consts.items()}
    for lid, s in zip(program.leaf_ids, leaf_shapes):
        shapes[lid] = tuple(s)
    shapes[program.x_id] = tuple(x_shape)
    for eqn in program.eqns:
        for o, av in zip(eqn.outs, eqn.out_avals):
            shapes[o] = tuple(getattr(av, "shape", ()))
    return shapes


# --------------------------------------------------------------------------- #
# replaying pieces of the program
# --------------------------------------------------------------------------- #


def _read(env, a):
    return a.val if isinstance(a, _Lit) else env[a]


def _static_env(program: _Program) -> dict:
    """Values of every id computable from constants alone (needed to replay chains)."""
    env = dict(program.consts)
    for eqn in program.eqns:
        if eqn.ins and all(isinstance(a, _Lit) or a in env for a in eqn.ins):
            for o, v in zip(eqn.outs, _bind(eqn, [_read(env, a) for a in eqn.ins])):
                env[o] = v
    return env


def _chain_fn(program: _Program, site: _Site, static_env: dict):
    """The linear map leaf ↦ the parameter operand of the site's contraction (or add)."""
    start = program.leaf_ids[site.leaf]
    return lambda leaf_value: _replay(program, site.chain[:-1], start, leaf_value, static_env)


def _bias_map(program: _Program, site: _Site, static_env: dict):
    """Linear map bias leaf ↦ its contribution to the add's output (incl. the add's own broadcast)."""
    chain = _chain_fn(program, site, static_env)
    sign = -1.0 if program.eqns[site.eqn].primitive.name == "sub" and site.param_pos == 1 else 1.0
    return lambda b: sign * jnp.broadcast_to(chain(b), site.out_shape)


def _replay(program: _Program, path, start_id, value, static_env):
    env = dict(static_env)
    env[start_id] = value
    val = value
    for i in path:
        eqn = program.eqns[i]
        (val,) = _bind(eqn, [_read(env, a) for a in eqn.ins])
        env[eqn.outs[0]] = val
    return val


def _ortho_scale(program, site, static_env, shapes, dtype) -> float:
    """c in ``chain(W) = c·Π(W)``: the chain is linear, so ‖chain(1)‖ / ‖1‖."""
    ones = jnp.ones(shapes[program.leaf_ids[site.leaf]], dtype)
    out = np.asarray(_chain_fn(program, site, static_env)(ones), np.float64)
    return float(np.sqrt(np.sum(np.square(out)) / ones.size))


def _to_positions(value, site: _Site, eqn: _Eqn, program: _Program):
    """Rearrange a value shaped like the contraction output to (S, F)."""
    if site.kind == "dense":
        if site.param_pos == 1:  # output axes: (data free..., weight free...)
            return value.reshape(site.S, site.F)
        return value.reshape(site.F, site.S).T
    fdim = eqn.params["dimension_numbers"].out_spec[1]
    return jnp.moveaxis(value, fdim, -1).reshape(site.S, site.F)


def _fold_biases(program: _Program, sites: tuple, shapes: dict, static_env: dict) -> tuple:
    """Fold ``y = c·(a W) + B(b)`` biases into the dense/conv site of ``a W``.

    Needs: the contraction's output reaches the add only through
    multiplications by constant scalars / dtype casts, each value used once;
    and ``B`` maps ``b`` to the same vector at every position (checked by
    replaying ``B`` on a probe). Then ``∂f/∂b = c_b Σ_s δ_s`` and the bias is
    the weight of an extra constant input column, so one Gram covers both.
    """
    consumers: dict[int, list[int]] = {}
    for i, eqn in enumerate(program.eqns):
        for a in eqn.ins:
            if isinstance(a, int):
                consumers.setdefault(a, []).append(i)
    add_at = {s.eqn: s for s in sites if s.kind == "add"}
    static_shapes = {k: tuple(np.shape(v)) for k, v in static_env.items()}
    folded_adds: set[int] = set()
    out = []
    for site in sites:
        if site.kind == "add":
            out.append(site)
            continue
        dtype = program.eqns[site.op_eqn].out_avals[0].dtype
        scale = _ortho_scale(program, site, static_env, shapes, dtype)
        site = dataclasses.replace(site, scale=scale)
        cur = program.eqns[site.op_eqn].outs[0]
        path = []
        target = None
        while len(consumers.get(cur, ())) == 1 and cur != program.out_id:
            i = consumers[cur][0]
            eqn = program.eqns[i]
            if i in add_at and add_at[i].param_pos != eqn.ins.index(cur):
                target = add_at[i]
                break
            others = [a for a in eqn.ins if a != cur]
            scalar_mul = eqn.primitive.name == "mul" and len(others) == 1 and _is_scalar_static(others[0], static_shapes)
            if not (scalar_mul or (eqn.primitive.name == "convert_element_type")):
                break
            path.append(i)
            cur = eqn.outs[0]
        if target is None or tuple(target.out_shape) != tuple(shapes[program.eqns[site.op_eqn].outs[0]]):
            out.append(site)
            continue
        y_shape = shapes[program.eqns[site.op_eqn].outs[0]]
        c_path = _replay(program, path, program.eqns[site.op_eqn].outs[0], jnp.ones(y_shape, dtype), static_env)
        c_path = np.asarray(c_path, np.float64)
        if not np.all(c_path == c_path.flat[0]):
            out.append(site)
            continue
        bias_shape = shapes[program.leaf_ids[target.leaf]]
        probe = jnp.arange(1, math.prod(bias_shape) + 1, dtype=dtype).reshape(bias_shape)
        bmap = _bias_map(program, target, static_env)(probe)
        rows = np.asarray(_to_positions(bmap, site, program.eqns[site.op_eqn], program), np.float64)
        row0 = rows[0]
        c_b = float(np.sum(np.abs(row0)) / np.sum(np.arange(1, row0.size + 1)))
        ok = (
            row0.size == probe.size
            and np.allclose(rows, row0[None, :], rtol=1e-6, atol=0)
            and c_b > 0
            and np.allclose(np.sort(np.abs(row0)) / c_b, np.arange(1, row0.size + 1), rtol=1e-5)
        )
        if not ok:
            out.append(site)
            continue
        folded_adds.add(target.eqn)
        out.append(
            dataclasses.replace(
                site,
                eqn=target.eqn,
                out_shape=target.out_shape,
                scale=scale * float(c_path.flat[0]),
                bias=target.leaf,
                bias_scale=c_b,
                C=site.C + 1,
            )
        )
    return tuple(s for s in out if not (s.kind == "add" and s.eqn in folded_adds))


# --------------------------------------------------------------------------- #
# the plan
# --------------------------------------------------------------------------- #


def _per_example_fn(apply_fn, treedef):
    def f(leaves, x):
        out = apply_fn(jax.tree_util.tree_unflatten(treedef, leaves), x[None])
        if jnp.ndim(out) != 2 or jnp.shape(out)[0] != 1:
            raise ValueError(
                "apply_fn: expected apply_fn(params, x) to return (N, K); "
                f"a batch of one example gives shape {jnp.shape(out)}"
            )
        return out[0]

    return f


def plan(apply_fn: Callable, params: Any, x: jax.Array) -> StructuredPlan:
    """Analyse ``apply_fn`` for inputs shaped like ``x[0]``; no model FLOPs are spent.

    Traces ``x ↦ apply_fn(params, x[None])[0]`` with :func:`jax.make_jaxpr`
    and returns a :class:`StructuredPlan` naming the recognised layers and
    the fallback leaves. :func:`ntkdyn.empirical_ntk` calls it for you.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    specs = [jax.ShapeDtypeStruct(np.shape(l), jnp.result_type(l)) for l in leaves]
    xs = jax.ShapeDtypeStruct(tuple(x.shape[1:]), jnp.result_type(x))
    closed = jax.make_jaxpr(_per_example_fn(apply_fn, treedef))(specs, xs)
    out_aval = closed.out_avals[0]
    program = _flatten(closed)
    shapes = _shapes_of(program, [s.shape for s in specs], xs.shape)
    sites, fallback, unused = _analyse(program, shapes)
    if sites and all(is_concrete(c) for c in program.consts.values()):
        with jax.ensure_compile_time_eval():
            static_env = _static_env(program)
            sites = _fold_biases(program, sites, shapes, static_env)
    flops, act = _ntk.jaxpr_cost(closed.jaxpr)
    fallback_size = sum(math.prod(specs[i].shape) for i in fallback)
    return StructuredPlan(program, sites, fallback, unused, flops, act, int(out_aval.shape[0]), fallback_size)


# --------------------------------------------------------------------------- #
# evaluation: forward with perturbations, then K reverse passes
# --------------------------------------------------------------------------- #


def _evaluate(program: _Program, sites: tuple, leaves, x, eps):
    """Run the per-example program, adding ``eps[s]`` to each site's perturbed value.

    Returns ``(out (K,), recorded)`` where ``recorded[s]`` is the data
    operand of a dense/conv site's contraction (None for bias sites).
    """
    env = dict(program.consts)
    for lid, v in zip(program.leaf_ids, leaves):
        env[lid] = v
    env[program.x_id] = x
    perturb_at = {s.eqn: n for n, s in enumerate(sites)}
    record_at = {s.op_eqn: n for n, s in enumerate(sites) if s.kind != "add"}
    recorded: list[Any] = [None] * len(sites)
    for i, eqn in enumerate(program.eqns):
        vals = [_read(env, a) for a in eqn.ins]
        outs = _bind(eqn, vals)
        n = record_at.get(i)
        if n is not None:
            recorded[n] = vals[1 - sites[n].param_pos]
        n = perturb_at.get(i)
        if n is not None:
            outs = (outs[0] + eps[n],)
        for o, v in zip(eqn.outs, outs):
            env[o] = v
    return _read(env, program.out_id), recorded


def _site_operands(site: _Site, program: _Program, a, deltas):
    """Per-example ``A (S, C)`` and ``D (K, S, F)`` of a dense or conv site (scaled)."""
    eqn = program.eqns[site.op_eqn]
    c = site.C - (site.bias is not None)
    if site.kind == "dense":
        (lc, rc), _ = eqn.params["dimension_numbers"]
        a_contract = list(lc if site.param_pos == 1 else rc)
        a_free = [d for d in range(a.ndim) if d not in a_contract]
        A = jnp.transpose(a, a_free + a_contract).reshape(site.S, c)
    else:
        A = _patches(a, site, eqn.params).reshape(site.S, c)
    D = jax.vmap(lambda d: _to_positions(d, site, eqn, program))(deltas)
    return A.astype(D.dtype) * jnp.asarray(site.scale, D.dtype), D


def _patches(a, site: _Site, p: dict):
    """im2col of one conv input: (out positions in output layout order, kernel offsets × c_in).

    Strided slices of the padded input, one per kernel offset: pure data
    movement (``lax.conv_general_dilated_patches`` would spend S·C² FLOPs on
    an identity-filter convolution). The feature order differs from the
    kernel's, by a fixed permutation, which inner products do not see.
    """
    dn = p["dimension_numbers"]
    if any(d != 1 for d in p["lhs_dilation"]) or isinstance(p["padding"], str):
        patches = jax.lax.conv_general_dilated_patches(
            a,
            filter_shape=site.filter_shape,
            window_strides=p["window_strides"],
            padding=p["padding"],
            lhs_dilation=p["lhs_dilation"],
            rhs_dilation=p["rhs_dilation"],
            dimension_numbers=dn,
            precision=jax.lax.Precision.HIGHEST,
        )
        return jnp.moveaxis(patches, dn.out_spec[1], -1)
    nsp = len(dn.lhs_spec) - 2
    x = jnp.transpose(a, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))  # (B, spatial..., C)
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *[(lo, hi, 0) for lo, hi in p["padding"]], (0, 0, 0)])
    out_shape = site.out_shape
    out_sp = [out_shape[dn.out_spec[2 + i]] for i in range(nsp)]
    strides, rdil = p["window_strides"], p["rhs_dilation"]
    pieces = []
    for offset in np.ndindex(*site.filter_shape):
        start = [0] + [o * r for o, r in zip(offset, rdil)] + [0]
        limit = [x.shape[0]] + [st + (n - 1) * s + 1 for st, n, s in zip(start[1:], out_sp, strides)] + [x.shape[-1]]
        pieces.append(jax.lax.slice(x, start, limit, [1, *strides, 1]))
    patches = jnp.stack(pieces, axis=-2)  # (B, out spatial..., offsets, C)
    patches = patches.reshape(*patches.shape[:-2], -1)
    # reorder (batch, spatial...) to the order these axes have in the conv output
    logical = {dn.out_spec[0]: 0, **{dn.out_spec[2 + i]: 1 + i for i in range(nsp)}}
    order = [logical[ax] for ax in range(nsp + 2) if ax != dn.out_spec[1]]
    return jnp.transpose(patches, (*order, nsp + 1))


def _uses_gram(site: _Site, n1: int, n2: int, k: int, trace_outputs: bool) -> bool:
    kk = k if trace_outputs else k * k
    gram = n1 * n2 * site.S**2 * (site.C + kk * site.F)
    jac = (n1 + n2) * k * site.S * site.C * site.F + n1 * n2 * kk * site.C * site.F
    return gram <= jac


def _features(plan_: StructuredPlan, leaves, x, n_other: int, trace_outputs: bool):
    """Per-example factors of the kernel for a batch ``x``.

    Returns ``(grams, jac)``: ``grams`` a list of ``(A (N,S,C), D (N,K,S,F))``
    pairs; ``jac`` an (N, K, P_j) array of per-example gradients of the
    leaves handled in Jacobian form (bias sites, convolutions with many
    positions, fallback leaves), or None.
    """
    program = plan_.program
    k = plan_.num_outputs
    sites = plan_.sites
    fb = plan_.fallback
    n = x.shape[0]
    static_env = _static_env(program)

    def per_example(xi):
        eps0 = [jnp.zeros(s.out_shape, program.eqns[s.eqn].out_avals[0].dtype) for s in sites]

        def f(eps, fb_leaves):
            full = list(leaves)
            for i, v in zip(fb, fb_leaves):
                full[i] = v
            return _evaluate(program, sites, full, xi, eps)

        out, vjp, rec = jax.vjp(f, eps0, [leaves[i] for i in fb], has_aux=True)
        d_eps, d_fb = jax.vmap(vjp)(jnp.eye(k, dtype=out.dtype))
        return rec, d_eps, d_fb

    rec, d_eps, d_fb = jax.vmap(per_example)(x)

    grams, jac_parts = [], []
    for s_idx, site in enumerate(sites):
        delta = d_eps[s_idx]  # (N, K, *out_shape)
        if site.kind == "add":
            _, bias_vjp = jax.vjp(_bias_map(program, site, static_env), leaves[site.leaf])
            (g,) = jax.vmap(bias_vjp)(delta.reshape(n * k, *site.out_shape))
            jac_parts.append(g.reshape(n, k, -1))
            continue
        if site.scale is None:  # bias folding was skipped (non-concrete constants)
            dtype = program.eqns[site.op_eqn].out_avals[0].dtype
            ones = jnp.ones(np.shape(leaves[site.leaf]), dtype)
            scale = jnp.sqrt(jnp.sum(jnp.square(_chain_fn(program, site, static_env)(ones))) / ones.size)
            site = dataclasses.replace(site, scale=scale)
        A, D = jax.vmap(lambda a, d: _site_operands(site, program, a, d))(rec[s_idx], delta)
        b2 = jnp.asarray(site.bias_scale**2 if site.bias is not None else 0.0, D.dtype)
        if _uses_gram(site, n, n_other, k, trace_outputs):
            grams.append((A, D, b2))
        else:
            if site.bias is not None:  # the folded bias is a constant input column
                A = jnp.concatenate([A, jnp.full((*A.shape[:2], 1), site.bias_scale, A.dtype)], axis=-1)
            jac_parts.append(jnp.einsum("nsc,nksf->nkcf", A, D).reshape(n, k, -1))
    for g in d_fb:
        jac_parts.append(g.reshape(n, k, -1))
    jac = jnp.concatenate(jac_parts, axis=-1) if jac_parts else None
    return grams, jac


def _contract_gram(A1, D1, A2, D2, b2, trace_outputs: bool):
    """``Σ_{s,s'} (A1_s·A2_s' + b²) (D1_ks·D2_ls')`` for all example pairs (b: folded bias scale)."""
    k = D1.shape[1]
    if A1.shape[1] == 1:
        g = A1[:, 0] @ A2[:, 0].T + b2
        if k == 1:
            h = D1[:, 0, 0] @ D2[:, 0, 0].T
            return g * h if trace_outputs else (g * h)[:, :, None, None]
        if trace_outputs:
            return g * (jnp.einsum("ikf,jkf->ij", D1[:, :, 0], D2[:, :, 0]) / k)
        return g[:, :, None, None] * jnp.einsum("ikf,jlf->ijkl", D1[:, :, 0], D2[:, :, 0])
    g = jnp.einsum("isc,jtc->ijst", A1, A2) + b2
    if trace_outputs:
        return jnp.einsum("iksf,jktf,ijst->ij", D1, D2, g, optimize=True) / k
    return jnp.einsum("iksf,jltf,ijst->ijkl", D1, D2, g, optimize=True)


def _contract_jac(j1, j2, trace_outputs: bool):
    if trace_outputs:
        return jnp.einsum("ikp,jkp->ij", j1, j2) / j1.shape[1]
    return jnp.einsum("ikp,jlp->ijkl", j1, j2)


@functools.partial(jax.jit, static_argnames=("apply_fn", "trace_outputs", "same"))
def structured_tile(apply_fn, params, x1, x2, *, trace_outputs: bool, same: bool) -> jax.Array:
    """One tile of the structured kernel (the tile signature of :data:`ntkdyn.ntk.METHODS`).

    ``Θ = Σ_dense/conv Σ_{s,s'} (a_s·a'_s')(δ_ks·δ'_ls') + J_rest J'_restᵀ``,
    shape (N1, N2, K, K), or (N1, N2) with ``trace_outputs`` (mean over k = l).
    """
    plan_ = plan(apply_fn, params, x1)
    leaves = jax.tree_util.tree_leaves(params)
    n1, n2 = x1.shape[0], x2.shape[0]
    g1, j1 = _features(plan_, leaves, x1, n2, trace_outputs)
    g2, j2 = (g1, j1) if same else _features(plan_, leaves, x2, n1, trace_outputs)
    k = plan_.num_outputs
    out_dtype = jax.eval_shape(apply_fn, params, x1[:1]).dtype

    def block(r1, r2):
        """Kernel rows r1 (slice of x1) against rows r2 (slice of x2)."""
        total = jnp.zeros(
            (r1.stop - r1.start, r2.stop - r2.start) if trace_outputs else (r1.stop - r1.start, r2.stop - r2.start, k, k),
            out_dtype,
        )
        for (A1, D1, b2), (A2, D2, _) in zip(g1, g2):
            total = total + _contract_gram(A1[r1], D1[r1], A2[r2], D2[r2], b2, trace_outputs)
        if j1 is not None:
            total = total + _contract_jac(j1[r1], j2[r2], trace_outputs)
        return total

    if not same:
        return block(slice(0, n1), slice(0, n2)).astype(out_dtype)
    # Θ(x, x) is symmetric: compute the upper block triangle only (B(B+1)/2 of B² products)
    nb = max(1, min(_MAX_SYMMETRIC_BLOCKS, round(n1 / _SYMMETRIC_BLOCK)))
    edges = [round(i * n1 / nb) for i in range(nb + 1)]
    sl = [slice(edges[i], edges[i + 1]) for i in range(nb)]
    blocks = {}
    for i in range(nb):
        for j in range(i, nb):
            blocks[i, j] = block(sl[i], sl[j])
    swap = (lambda b: b.T) if trace_outputs else (lambda b: b.transpose(1, 0, 3, 2))
    rows = [
        jnp.concatenate([blocks[i, j] if j >= i else swap(blocks[j, i]) for j in range(nb)], axis=1)
        for i in range(nb)
    ]
    return jnp.concatenate(rows, axis=0).astype(out_dtype)


def _rows_independent(apply_fn, params, x1, x2) -> bool:
    """Cheap probe that row 0 of the output depends on input 0 only (no batch statistics)."""
    pool = x1 if x2 is None else jnp.concatenate([x1[:1], x2[:1], x1[1:2]])
    u = pool[0]
    others = [r for r in pool[1:3] if not bool(jnp.all(r == u))]
    if not others:
        return True
    alone = np.asarray(apply_fn(params, u[None]))[0]
    paired = np.asarray(apply_fn(params, jnp.stack([u, others[0]])))[0]
    if not (np.all(np.isfinite(alone)) and np.all(np.isfinite(paired))):
        return False  # non-finite outputs prove nothing: leave it to a generic method
    scale = float(np.max(np.abs(alone))) if alone.size else 0.0
    return bool(np.allclose(paired, alone, rtol=1e-3, atol=1e-5 * scale + 1e-30))


def structured_cost(apply_fn, params, x1, x2, trace_outputs: bool):
    """:class:`ntkdyn.ntk.TileCost` of :func:`structured_tile`; None when the method does not apply.

    Per side of ``n`` examples: one forward (``F`` FLOPs each) and K reverse
    passes (≈ 2F each); per dense/conv site the cheaper of the Gram form
    ``n1·n2·S²·(C + K²F)`` and the Jacobian form ``(n1+n2)·K·S·C·F +
    n1·n2·K²·C·F`` (K instead of K² when traced); the rest contracted as
    per-example Jacobians. Memory: activations and K cotangents per
    example, the per-site factors, the Jacobian-form gradients, the tile.
    """
    try:
        plan_ = plan(apply_fn, params, x1)
    except Exception:  # untraceable per-example function: let another method handle it
        return None
    if _all_concrete(params, x1, x2) and not _rows_independent(apply_fn, params, x1, x2):
        return None
    k = plan_.num_outputs
    kk = k if trace_outputs else k * k
    item = jnp.dtype(jax.eval_shape(apply_fn, params, x1[:1]).dtype).itemsize
    F, A = plan_.forward_flops, plan_.activation_size
    leaves = jax.tree_util.tree_leaves(params)
    add_size = sum(math.prod(np.shape(leaves[s.leaf])) for s in plan_.sites if s.kind == "add")

    def split(n1, n2):
        gram = [s for s in plan_.sites if s.kind != "add" and _uses_gram(s, n1, n2, k, trace_outputs)]
        jac = [s for s in plan_.sites if s.kind != "add" and s not in gram]
        return gram, jac

    def flops(n1, n2):
        gram, jac = split(n1, n2)
        side = (n1 + n2) * F * (1 + 2 * k + (2 * k if plan_.fallback else 0))
        g = sum(2.0 * n1 * n2 * s.S**2 * (s.C + kk * s.F) for s in gram)
        pj = add_size + plan_.fallback_size + sum(s.C * s.F for s in jac)
        j = sum(2.0 * (n1 + n2) * k * s.S * s.C * s.F for s in jac) + 2.0 * n1 * n2 * kk * pj
        return side + g + j

    def memory(n1, n2):
        gram, jac = split(n1, n2)
        n = n1 + n2
        acts = n * A * (2 + k)
        factors = n * sum(s.S * s.C + k * s.S * s.F for s in plan_.sites if s.kind != "add")
        pj = add_size + plan_.fallback_size + sum(s.C * s.F for s in jac)
        gram_tmp = max([n1 * n2 * s.S**2 for s in gram if s.S > 1], default=0)
        return item * (acts + factors + n * k * pj + n1 * n2 * kk * 3 + gram_tmp)

    return _ntk.TileCost(flops=flops, memory=memory)


def _all_concrete(*trees) -> bool:
    return all(is_concrete(l) for t in trees if t is not None for l in jax.tree_util.tree_leaves(t))


_ntk.register_method("structured", structured_tile, structured_cost)
