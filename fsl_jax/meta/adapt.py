"""The inner loop shared by every gradient-based meta-learner: SGD on a task's support set.

A model is *any* function ``apply_fn(params, x) -> outputs`` (usually a Flax module's
``apply``) plus a loss ``loss_fn(outputs, y) -> scalar``; nothing here knows about images,
classes or BatchNorm, so the same :func:`adapt` serves the Conv4 classifiers of
:mod:`fsl_jax.meta.maml` and a U-Net segmenter with pixel-wise binary cross-entropy.

Example (a segmenter; ``masks`` are {0, 1} floats of the logits' shape)::

    unet = UNet()
    apply_fn = lambda p, x: unet.apply({"params": p}, x)
    bce = lambda logits, masks: optax.sigmoid_binary_cross_entropy(logits, masks).mean()
    adapted, inner_losses = adapt(apply_fn, bce, params, (support_x, support_masks), steps=5, lr=0.1)
    query_loss = bce(apply_fn(adapted, query_x), query_masks)
    meta_grad = jax.grad(...)  # of query_loss w.r.t. params: exact second order through the loop
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.tree_util import keystr

from fsl_jax.errors import ConfigError, check_count, check_positive

Params = Any


def check_inner_loop(inner_steps, test_inner_steps, inner_lr) -> None:
    """A MAML-style learner's inner-loop options, each named when it is wrong: the step counts are
    non-negative integers (or None: as in training), the learning rate a positive number."""
    for name, steps in (("inner_steps", inner_steps), ("test_inner_steps", test_inner_steps)):
        if steps is not None:
            check_count(name, steps, least=0)
    check_positive("inner_lr", inner_lr)


def param_mask(params: Params, predicate: Callable[[str, jax.Array], bool]) -> Params:
    """A boolean pytree like ``params``: ``predicate(path, leaf)`` for each leaf.

    ``path`` is the leaf's key path as a string, e.g. ``"['head']['kernel']"``, so
    ``param_mask(p, lambda path, _: path.startswith("['head']"))`` selects the head (ANIL).
    """
    return jax.tree_util.tree_map_with_path(lambda path, leaf: bool(predicate(keystr(path), leaf)), params)


def _per_leaf(tree, treedef, name: str) -> list:
    """``tree`` (a scalar, broadcast, or a pytree with the structure of params) as a list of leaves."""
    if isinstance(tree, (bool, int, float)) or getattr(tree, "ndim", None) == 0:
        return [tree] * treedef.num_leaves
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{name} must be a scalar or a pytree with the structure of params: {err}") from None


def adapt(apply_fn: Callable[[Params, Any], Any], loss_fn: Callable[[Any, Any], jax.Array], params: Params,
          support: tuple[Any, Any], steps: int, lr, mask: Params | None = None, first_order: bool = False,
          unroll: int | bool = 1) -> tuple[Params, jax.Array]:
    """``steps`` steps of SGD on ``loss_fn(apply_fn(params, x), y)`` for ``support = (x, y)``.

    Returns ``(adapted_params, inner_losses)``: the adapted pytree (structure of ``params``)
    and the support loss before each step, ``[steps]``. The loop is a ``jax.lax.scan``, so
    ``jax.grad`` of anything computed from ``adapted_params`` is the exact second-order
    meta-gradient of MAML (Finn, Abbeel and Levine, ICML 2017) through all the steps.

    lr: a scalar or a pytree like ``params`` (per-parameter rates: Meta-SGD, Li et al. 2017);
        it may be a traced value, and gradients flow into it.
    mask: ``None`` (every leaf adapts) or a boolean pytree like ``params`` (see
        :func:`param_mask`); leaves marked ``False`` keep their value in the inner loop, and
        no inner gradient is computed for them (ANIL, Raghu et al. 2020, adapts the head only).
        They still receive meta-gradients from the outer loss.
    first_order: treat the inner gradients as constants (``stop_gradient``): FOMAML. The
        meta-gradient is then the query gradient at the adapted parameters.
    unroll: passed to ``jax.lax.scan`` (``True`` unrolls all steps: longer compilation,
        sometimes faster steps).
    """
    check_count("steps", steps, least=0)
    leaves, treedef = jax.tree.flatten(params)
    adapts = _per_leaf(True if mask is None else mask, treedef, "mask")
    rates = _per_leaf(lr, treedef, "lr")
    chosen = [i for i, m in enumerate(adapts) if m]
    if not chosen or steps == 0:
        return params, jnp.zeros((0,), jnp.result_type(float))
    x, y = support

    def merged(adapted):
        full = list(leaves)
        for i, leaf in zip(chosen, adapted):
            full[i] = leaf
        return jax.tree.unflatten(treedef, full)

    def support_loss(adapted):
        return loss_fn(apply_fn(merged(adapted), x), y)

    def step(adapted, _):
        loss, grads = jax.value_and_grad(support_loss)(adapted)
        if first_order:
            grads = jax.lax.stop_gradient(grads)
        return [p - rates[i] * g for i, p, g in zip(chosen, adapted, grads)], loss

    adapted, losses = jax.lax.scan(step, [leaves[i] for i in chosen], length=steps, unroll=unroll)
    return merged(adapted), losses
