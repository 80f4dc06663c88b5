"""MAML segmenter: a small U-Net whose initialisation is meta-learned (Finn, Abbeel and Levine, ICML 2017).

For each task, ``inner_steps`` of SGD on the support images and masks (pixel-wise binary
cross-entropy) adapt the U-Net (:func:`fsl_jax.meta.adapt`, a ``lax.scan``); the query loss
at the adapted parameters is differentiated through the whole inner loop, so the
meta-gradient is exact and second order unless ``first_order``. The U-Net normalises each
image on its own (:mod:`fsl_jax.nets.decoders`), so adaptation and prediction do not depend
on what else is in the batch, and the adapted parameters export as a plain U-Net.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from fsl_jax.learner import Learner, init_params
from fsl_jax.meta.adapt import adapt, check_inner_loop
from fsl_jax.nets.decoders import UNet
from fsl_jax.seg.common import bce, check_segmenter, segmentation_loss


def maml_segmenter(widths: Sequence[int] = (8, 16, 32), upsample: str = "bilinear", inner_steps: int = 3,
                   test_inner_steps: int | None = None, inner_lr: float = 0.1, first_order: bool = False,
                   learn_inner_lr: bool = False, dice_weight: float = 1.0, threshold: float = 0.5, im2col: bool = True,
                   task_map: str = "vmap") -> Learner:
    """The MAML segmenter as a :class:`Learner`; parameters ``{"unet": ...}`` (plus ``"inner_lr"``, a
    learned rate per parameter, with ``learn_inner_lr``: Meta-SGD, Li et al. 2017).

    inner_steps / test_inner_steps: SGD steps on the support set in training / in ``predict``
        (None: as in training). inner_lr: the inner learning rate (Meta-SGD: every rate's start).
    first_order: FOMAML (inner gradients held constant).
    dice_weight: weight of a soft Dice term in the query (outer) loss; the inner loss is
        cross-entropy alone.
    threshold: a pixel counts as foreground in the training metrics (iou, accuracy) where its
        probability exceeds this (configs: ``eval.threshold``, so training and held-out scores agree).
    im2col: convolutions as matrix products on CPU (faster with per-task kernels; no forward-mode
        differentiation on CPU: see :func:`fsl_jax.nets.layers.conv`).
    task_map: "vmap", "map" or "unroll" over a batch of tasks (fsl_jax.learner.map_tasks). Default vmap:
        on CPU this U-Net's meta-step is as fast unrolled (0.39 s, `fsl-jax bench train --config
        experiments/segmentation/maml_unet_1shot.yaml`), which takes twice as long to compile.
    """
    check_inner_loop(inner_steps, test_inner_steps, inner_lr)
    check_segmenter(threshold, dice_weight=dice_weight)
    unet = UNet(tuple(widths), upsample, im2col=im2col)
    apply = lambda params, x: unet.apply({"params": params}, x)[..., 0]
    test_steps = inner_steps if test_inner_steps is None else test_inner_steps

    def init(rng, task):
        params = {"unet": init_params(unet, rng, task.support_x)}
        if learn_inner_lr:
            params["inner_lr"] = jax.tree.map(lambda p: jnp.full_like(p, inner_lr), params["unet"])
        return params

    def adapted(params, task, steps, first):
        lr = params["inner_lr"] if learn_inner_lr else inner_lr
        return adapt(apply, bce, params["unet"], (task.support_x, task.support_mask), steps, lr, first_order=first)[0]

    def loss(params, task, rng):
        logits = apply(adapted(params, task, inner_steps, first_order), task.query_x)
        return segmentation_loss(logits, task.query_mask, dice_weight, threshold)

    def predict(params, task, rng):
        return apply(adapted(params, task, test_steps, True), task.query_x)

    return Learner(init=init, task_loss=loss, task_predict=predict, task_map=task_map)
