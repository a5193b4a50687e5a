"""Gram evaluation: the structured kernel from activations and output cotangents.

For a recognised dense/conv site with per-example data operand ``A`` (S, C)
and output cotangents ``D_k`` (S, F) (scaled by the site's ``scale``)::

    Θ_W(x, x')[k, l] = Σ_{s,s'} (A_s · A'_s' + b²) (D_{k,s} · D'_{l,s'})

(``b`` the folded bias column's value), computed as a product of Gram
matrices, or — when ``S²`` makes that dearer — by contracting the per-example
weight gradients ``Aᵀ D_k``. All ``D`` come from one reverse pass per output
(K in all), taken with respect to zero perturbations added to each site's
output; the fallback leaves' per-example gradients come from the same passes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntkdyn.kernels import costs, layout
from ntkdyn.kernels.precision import kernel_jit
from ntkdyn.kernels.structured.jaxpr import Program, bind, read, static_env
from ntkdyn.kernels.structured.matching import Site, StructuredPlan, Unsupported, bias_map, chain_fn, plan, to_positions
from ntkdyn.models import Model

__all__ = ["structured_tile", "structured_cost", "rows_independent", "uses_gram"]

# symmetric tiles are split into row blocks of about this many examples
_SYMMETRIC_BLOCK = 256
_MAX_SYMMETRIC_BLOCKS = 8


def _evaluate(program: Program, sites: tuple, state, leaves, x, eps):
    """Run the per-example program, adding ``eps[s]`` to each site's perturbed value.

    Returns ``(out (K,), recorded)`` where ``recorded[s]`` is the data
    operand of a dense/conv site's contraction (None for bias sites).
    """
    env = dict(program.consts)
    env.update(zip(program.state_ids, state))
    env.update(zip(program.leaf_ids, leaves))
    env[program.x_id] = x
    perturb_at = {s.eqn: n for n, s in enumerate(sites)}
    record_at = {s.op_eqn: n for n, s in enumerate(sites) if s.kind != "add"}
    recorded: list[Any] = [None] * len(sites)
    for i, eqn in enumerate(program.eqns):
        vals = [read(env, a) for a in eqn.ins]
        outs = bind(eqn, vals)
        n = record_at.get(i)
        if n is not None:
            recorded[n] = vals[1 - sites[n].param_pos]
        n = perturb_at.get(i)
        if n is not None:
            outs = (outs[0] + eps[n],)
        env.update(zip(eqn.outs, outs))
    return read(env, program.out_id), recorded


def _site_operands(site: Site, program: Program, a, deltas):
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
    D = jax.vmap(lambda d: to_positions(d, site, eqn))(deltas)
    return A.astype(D.dtype) * jnp.asarray(site.scale, D.dtype), D


def _patches(a, site: Site, p: dict):
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
    out_sp = [site.out_shape[dn.out_spec[2 + i]] for i in range(nsp)]
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


def uses_gram(site: Site, n1: int, n2: int, k: int, trace_outputs: bool) -> bool:
    """Whether the Gram form ``n1·n2·S²·(C + K²F)`` costs no more than the weight-gradient form."""
    kk = k if trace_outputs else k * k
    gram = n1 * n2 * site.S**2 * (site.C + kk * site.F)
    jac = (n1 + n2) * k * site.S * site.C * site.F + n1 * n2 * kk * site.C * site.F
    return gram <= jac


def _features(plan_: StructuredPlan, state, leaves, x, n_other: int, trace_outputs: bool):
    """Per-example factors of the kernel for a batch ``x``.

    Returns ``(grams, jac)``: ``grams`` a list of ``(A (N,S,C), D (N,K,S,F), b²)``;
    ``jac`` an (N, K, P_j) array of per-example gradients of the leaves
    handled in Jacobian form (bias sites, convolutions with many positions,
    fallback leaves), or None.
    """
    program = plan_.program
    k = plan_.num_outputs
    sites = plan_.sites
    fb = plan_.fallback
    n = x.shape[0]
    env = static_env(program)

    def per_example(xi):
        eps0 = [jnp.zeros(s.out_shape, program.eqns[s.eqn].out_avals[0].dtype) for s in sites]

        def f(eps, fb_leaves):
            full = list(leaves)
            for i, v in zip(fb, fb_leaves):
                full[i] = v
            return _evaluate(program, sites, state, full, xi, eps)

        out, vjp, rec = jax.vjp(f, eps0, [leaves[i] for i in fb], has_aux=True)
        d_eps, d_fb = jax.vmap(vjp)(jnp.eye(k, dtype=out.dtype))
        return rec, d_eps, d_fb

    rec, d_eps, d_fb = jax.vmap(per_example)(x)

    grams, jac_parts = [], []
    for s_idx, site in enumerate(sites):
        delta = d_eps[s_idx]  # (N, K, *out_shape)
        if site.kind == "add":
            _, bias_vjp = jax.vjp(bias_map(program, site, env), leaves[site.leaf])
            (g,) = jax.vmap(bias_vjp)(delta.reshape(n * k, *site.out_shape))
            jac_parts.append(g.reshape(n, k, -1))
            continue
        if site.scale is None:  # bias folding was skipped (non-concrete constants)
            dtype = program.eqns[site.op_eqn].out_avals[0].dtype
            ones = jnp.ones(np.shape(leaves[site.leaf]), dtype)
            scale = jnp.sqrt(jnp.sum(jnp.square(chain_fn(program, site, env)(ones))) / ones.size)
            site = dataclasses.replace(site, scale=scale)
        A, D = jax.vmap(lambda a, d: _site_operands(site, program, a, d))(rec[s_idx], delta)
        b2 = jnp.asarray(site.bias_scale**2 if site.bias is not None else 0.0, D.dtype)
        if uses_gram(site, n, n_other, k, trace_outputs):
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
        h = layout.contract(D1[:, :, 0], D2[:, :, 0], trace_outputs)
        return g * h if trace_outputs else g[:, :, None, None] * h
    g = jnp.einsum("isc,jtc->ijst", A1, A2) + b2
    if trace_outputs:
        return jnp.einsum("iksf,jktf,ijst->ij", D1, D2, g, optimize=True) / k
    return jnp.einsum("iksf,jltf,ijst->ijkl", D1, D2, g, optimize=True)


@kernel_jit(static_argnames=("trace_outputs", "same"))
def structured_tile(model: Model, params: Any, x1: jax.Array, x2: jax.Array, *, trace_outputs: bool, same: bool):
    """One tile of the structured kernel (the tile signature of :data:`ntkdyn.kernels.METHODS`).

    ``Θ = Σ_dense/conv Σ_{s,s'} (a_s·a'_s')(δ_ks·δ'_ls') + J_rest J'_restᵀ``,
    shape (N1, N2, K, K), or (N1, N2) with ``trace_outputs`` (mean over k = l).
    A symmetric tile computes its upper block triangle only.
    """
    plan_ = plan(model, params, x1)
    state = jax.tree_util.tree_leaves(model)
    leaves = jax.tree_util.tree_leaves(params)
    n1, n2 = x1.shape[0], x2.shape[0]
    g1, j1 = _features(plan_, state, leaves, x1, n2, trace_outputs)
    g2, j2 = (g1, j1) if same else _features(plan_, state, leaves, x2, n1, trace_outputs)
    out_dtype = costs.output_dtype(model, params, x1)
    shape = layout.kernel_shape(0, 0, plan_.num_outputs, trace_outputs)[2:]

    def block(r1: slice, r2: slice):
        """Kernel rows r1 (slice of x1) against rows r2 (slice of x2)."""
        total = jnp.zeros((r1.stop - r1.start, r2.stop - r2.start, *shape), out_dtype)
        for (A1, D1, b2), (A2, D2, _) in zip(g1, g2):
            total = total + _contract_gram(A1[r1], D1[r1], A2[r2], D2[r2], b2, trace_outputs)
        if j1 is not None:
            total = total + layout.contract(j1[r1], j2[r2], trace_outputs)
        return total

    if not same:
        return block(slice(0, n1), slice(0, n2)).astype(out_dtype)
    nb = max(1, min(_MAX_SYMMETRIC_BLOCKS, round(n1 / _SYMMETRIC_BLOCK)))
    edges = [round(i * n1 / nb) for i in range(nb + 1)]
    rows = [slice(edges[i], edges[i + 1]) for i in range(nb)]
    full = layout.assemble(lambda i, j: block(rows[i], rows[j]), nb, nb, symmetric=True, trace_outputs=trace_outputs)
    return full.astype(out_dtype)


def rows_independent(model: Model, params: Any, x1, x2) -> bool:
    """Cheap probe that row 0 of the output depends on input 0 only (no batch statistics).

    Runs the model on one and on two examples (concrete values); non-finite
    outputs prove nothing and count as "not independent".
    """
    pool = x1 if x2 is None else jnp.concatenate([x1[:1], x2[:1], x1[1:2]])
    u = pool[0]
    others = [r for r in pool[1:3] if not bool(jnp.all(r == u))]
    if not others:
        return True
    alone = np.asarray(model(params, u[None]))[0]
    paired = np.asarray(model(params, jnp.stack([u, others[0]])))[0]
    if not (np.all(np.isfinite(alone)) and np.all(np.isfinite(paired))):
        return False
    scale = float(np.max(np.abs(alone))) if alone.size else 0.0
    return bool(np.allclose(paired, alone, rtol=1e-3, atol=1e-5 * scale + 1e-30))


def structured_cost(model: Model, params: Any, x1, x2, trace_outputs: bool) -> costs.TileCost | None:
    """:class:`~ntkdyn.kernels.TileCost` of :func:`structured_tile`; None when the model cannot be analysed.

    Per side of ``n`` examples: one forward (``F`` FLOPs each) and K reverse
    passes (≈ 2F each); per dense/conv site the cheaper of the Gram form
    ``n1·n2·S²·(C + K²F)`` and the Jacobian form ``(n1+n2)·K·S·C·F +
    n1·n2·K²·C·F`` (K instead of K² when traced); the rest contracted as
    per-example Jacobians. Memory: activations and K cotangents per
    example, the per-site factors, the Jacobian-form gradients, the tile.
    Shape-level only: whether the model mixes rows is :func:`rows_independent`.
    """
    del x2
    try:
        plan_ = plan(model, params, x1)
    except Unsupported:
        return None
    k = plan_.num_outputs
    kk = k if trace_outputs else k * k
    item = costs.itemsize(model, params, x1)
    F, A = plan_.forward_flops, plan_.activation_size
    leaves = jax.tree_util.tree_leaves(params)
    dense = [s for s in plan_.sites if s.kind != "add"]
    add_size = sum(math.prod(np.shape(leaves[s.leaf])) for s in plan_.sites if s.kind == "add")

    def split(n1, n2):
        gram = [s for s in dense if uses_gram(s, n1, n2, k, trace_outputs)]
        return gram, [s for s in dense if s not in gram]

    def jacobian_size(jac):
        return add_size + plan_.fallback_size + sum(s.C * s.F for s in jac)

    def flops(n1, n2):
        gram, jac = split(n1, n2)
        side = (n1 + n2) * F * (1 + 2 * k + (2 * k if plan_.fallback else 0))
        g = sum(2.0 * n1 * n2 * s.S**2 * (s.C + kk * s.F) for s in gram)
        j = sum(2.0 * (n1 + n2) * k * s.S * s.C * s.F for s in jac) + 2.0 * n1 * n2 * kk * jacobian_size(jac)
        return side + g + j

    def memory(n1, n2):
        gram, jac = split(n1, n2)
        n = n1 + n2
        acts = n * A * (2 + k)
        factors = n * sum(s.S * s.C + k * s.S * s.F for s in dense)
        gram_tmp = max([n1 * n2 * s.S**2 for s in gram if s.S > 1], default=0)
        return item * (acts + factors + n * k * jacobian_size(jac) + n1 * n2 * kk * 3 + gram_tmp)

    return costs.TileCost(flops=flops, memory=memory)
