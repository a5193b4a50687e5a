"""Reading a model's jaxpr: a flat program, replayable equation by equation.

The per-example function is traced once with :func:`jax.make_jaxpr` (public
``jax.extend.core`` surfaces only); nested ``jit`` calls are inlined, so the
program is one flat list of equations over integer value ids. Literals stay
inline (:class:`Lit`); constants captured by the model keep their values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from jax.extend import core as jex_core

__all__ = ["Lit", "Eqn", "Program", "flatten", "bind", "read", "shapes_of", "static_env", "replay"]

_CALL_PRIMITIVES = ("jit", "pjit", "closed_call", "core_call")


@dataclasses.dataclass(frozen=True)
class Lit:
    """A literal operand (its value is part of the program)."""

    val: Any


@dataclasses.dataclass(frozen=True)
class Eqn:
    """One primitive application: ``outs = primitive.bind(*ins, **params)``."""

    primitive: Any
    params: dict
    ins: tuple  # ints (value ids) or Lit
    outs: tuple  # ints
    out_avals: tuple


@dataclasses.dataclass(frozen=True)
class Program:
    """A flat program ``(state, leaves, x) -> out``.

    Attributes:
      eqns: the equations in evaluation order.
      state_ids: ids of the model's held arrays (traced inputs that are data).
      leaf_ids: ids of the parameter leaves (``tree_leaves(params)`` order).
      x_id: id of the (single-example) input.
      consts: id -> value of every captured constant.
      out_id: id (or :class:`Lit`) of the output.
    """

    eqns: tuple
    state_ids: tuple
    leaf_ids: tuple
    x_id: int
    consts: dict
    out_id: Any


def flatten(closed, n_state: int) -> Program:
    """Inline nested calls of a ``ClosedJaxpr`` whose inputs are ``(*state, *leaves, x)``."""
    counter = iter(range(1 << 62))
    eqns: list[Eqn] = []
    consts: dict[int, Any] = {}

    def atom(env, v):
        if isinstance(v, jex_core.Literal):
            return Lit(v.val)
        return env[v]

    def bind_consts(jaxpr, values, env):
        for cv, c in zip(jaxpr.constvars, values):
            env[cv] = cid = next(counter)
            consts[cid] = c

    def walk(jaxpr, env):
        for eqn in jaxpr.eqns:
            ins = tuple(atom(env, v) for v in eqn.invars)
            inner = eqn.params.get("jaxpr") if eqn.primitive.name in _CALL_PRIMITIVES else None
            if isinstance(inner, jex_core.ClosedJaxpr):
                ienv = {}
                bind_consts(inner.jaxpr, inner.consts, ienv)
                ienv.update(zip(inner.jaxpr.invars, ins))
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
            eqns.append(Eqn(eqn.primitive, dict(eqn.params), ins, tuple(outs), tuple(ov.aval for ov in eqn.outvars)))

    env = {}
    bind_consts(closed.jaxpr, closed.consts, env)
    ids = []
    for iv in closed.jaxpr.invars:
        env[iv] = vid = next(counter)
        ids.append(vid)
    walk(closed.jaxpr, env)
    (out,) = closed.jaxpr.outvars
    return Program(tuple(eqns), tuple(ids[:n_state]), tuple(ids[n_state:-1]), ids[-1], consts, atom(env, out))


def bind(eqn: Eqn, vals) -> tuple:
    """Apply one equation to operand values; always a tuple of outputs."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = ()
    if isinstance(params, tuple):  # older JAX returned (subfuns, params)
        subfuns, params = params
    out = eqn.primitive.bind(*subfuns, *vals, **params)
    return out if eqn.primitive.multiple_results else (out,)


def read(env: dict, a):
    """Value of an operand: the literal's value or ``env[id]``."""
    return a.val if isinstance(a, Lit) else env[a]


def shapes_of(program: Program, state_shapes, leaf_shapes, x_shape) -> dict:
    """id -> shape of every value of the program."""
    shapes = {cid: tuple(np.shape(c)) for cid, c in program.consts.items()}
    for ids, given in ((program.state_ids, state_shapes), (program.leaf_ids, leaf_shapes)):
        shapes.update((i, tuple(s)) for i, s in zip(ids, given))
    shapes[program.x_id] = tuple(x_shape)
    for eqn in program.eqns:
        for o, av in zip(eqn.outs, eqn.out_avals):
            shapes[o] = tuple(getattr(av, "shape", ()))
    return shapes


def static_env(program: Program) -> dict:
    """Values of every id computable from constants alone (needed to replay chains)."""
    env = dict(program.consts)
    for eqn in program.eqns:
        if eqn.ins and all(isinstance(a, Lit) or a in env for a in eqn.ins):
            env.update(zip(eqn.outs, bind(eqn, [read(env, a) for a in eqn.ins])))
    return env


def replay(program: Program, path, start_id: int, value, env: dict):
    """Run the single-output equations ``path`` (indices) with ``start_id`` set to ``value``; their last output."""
    env = dict(env)
    env[start_id] = value
    val = value
    for i in path:
        eqn = program.eqns[i]
        (val,) = bind(eqn, [read(env, a) for a in eqn.ins])
        env[eqn.outs[0]] = val
    return val
