"""Analytic FLOP counts, for reporting achieved GFLOP/s against the machine's GEMM limit.

A model's forward FLOPs are read off its traced program: 2 x multiply-adds of every matrix
product and convolution (elementwise work, BatchNorm, pooling are not counted). A gradient
costs the forward plus twice it for the backward (input and weight gradients), and reverse
mode through a computation costs twice that computation, which gives, per task with
forward FLOPs ``Fs`` on the support and ``Fq`` on the query set and ``S`` inner steps:

* second-order MAML: ``S * (3 Fs + 2 * 3 Fs) + 3 Fq``  (each step differentiated through)
* first-order MAML:  ``S * 3 Fs + 3 Fq``
* Reptile:           ``S * 3 Fs + Fq``  (the query pass only reports the loss)
"""
from __future__ import annotations

import math
from typing import Callable

import jax
from jax.extend import core as jcore

KINDS = ("second_order", "first_order", "reptile")


def _eqn_flops(eqn) -> int:
    name = eqn.primitive.name
    if name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
        per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
        return 2 * math.prod(eqn.outvars[0].aval.shape) * per_output
    return 0


def _jaxpr_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    total += _jaxpr_flops(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    total += _jaxpr_flops(sub)
    return total


def forward_flops(fn: Callable, *args) -> int:
    """FLOPs of the matrix products and convolutions of ``fn(*args)`` (traced, not run).

    Control flow is not expected (a model's forward pass); sub-programs such as ``jit``
    calls are counted once each time they are called.
    """
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def meta_step_flops(support_flops: int, query_flops: int, inner_steps: int, tasks: int, kind: str) -> int:
    """Analytic FLOPs of one meta-step (see the module docstring)."""
    if kind == "second_order":
        per_task = inner_steps * 9 * support_flops + 3 * query_flops
    elif kind == "first_order":
        per_task = inner_steps * 3 * support_flops + 3 * query_flops
    elif kind == "reptile":
        per_task = inner_steps * 3 * support_flops + query_flops
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return tasks * per_task
