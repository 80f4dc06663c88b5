"""Segmenters: U-Net parts, prototype segmenter, Siamese-U-Net, MAML segmenter (tiny shapes)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsl_jax.data.segmentation import SegEpisode
from fsl_jax.learner import first_task
from fsl_jax.nets import Conv4
from fsl_jax.nets.decoders import UNet
from fsl_jax.seg import maml_segmenter, prototype_segmenter, siamese_unet
from fsl_jax.seg.common import contrastive_batch_loss, cosine, masked_average, soft_dice


def toy_batch(tasks=2, shots=1, queries=2, size=16, support_size=None, seed=0) -> SegEpisode:
    """Bright squares (the class) and dim noise on black; masks are the squares."""
    rng = np.random.default_rng(seed)

    def images(n, s):
        x = rng.random((tasks, n, s, s, 3)).astype(np.float32) * 0.2
        m = np.zeros((tasks, n, s, s), np.float32)
        for t in range(tasks):
            for i in range(n):
                r, c = rng.integers(0, s - s // 3, 2)
                m[t, i, r: r + s // 3, c: c + s // 3] = 1
        return np.where(m[..., None] > 0, 0.9, x).astype(np.float32), m

    sx, sm = images(shots, support_size or size)
    qx, qm = images(queries, size)
    return SegEpisode(sx, sm, qx, qm, np.arange(tasks, dtype=np.int32), np.zeros(tasks, np.int32))


@pytest.mark.parametrize("upsample", ["bilinear", "transpose"])
def test_unet_keeps_odd_sizes(upsample):
    x = jnp.asarray(np.random.default_rng(0).random((2, 13, 11, 3)), jnp.float32)
    net = UNet((4, 8, 8), upsample, outputs=5)
    params = net.init(jax.random.PRNGKey(0), x)["params"]
    assert net.apply({"params": params}, x).shape == (2, 13, 11, 5)


def test_unet_im2col_matches_xla_convolutions():
    x = jnp.asarray(np.random.default_rng(0).random((2, 12, 12, 3)), jnp.float32)
    params = UNet((4, 8)).init(jax.random.PRNGKey(0), x)["params"]
    np.testing.assert_allclose(UNet((4, 8), im2col=True).apply({"params": params}, x),
                               UNet((4, 8)).apply({"params": params}, x), atol=1e-4)


def test_pooling_and_cosine_are_finite_for_empty_masks():
    features = jnp.ones((2, 4, 4, 3))
    np.testing.assert_array_equal(masked_average(features, jnp.zeros((2, 4, 4))), 0.0)
    grad = jax.grad(lambda p: cosine(features, p).sum())(jnp.zeros(3))
    assert np.isfinite(grad).all() and np.isfinite(cosine(features, jnp.zeros(3))).all()
    logits = jnp.full((1, 4, 4), -10.0)
    assert float(soft_dice(logits, jnp.zeros((1, 4, 4)))) < 0.01  # empty prediction of an empty mask: no loss


def test_prototype_segmenter_shapes_alignment_and_gradients():
    batch = toy_batch()
    backbone = Conv4(width=8, blocks=2, pooled_blocks=1)
    with_align, without = prototype_segmenter(backbone), prototype_segmenter(backbone, align_weight=0.0)
    params = with_align.init(jax.random.PRNGKey(0), first_task(batch))
    assert jax.eval_shape(with_align.predict, params, batch, jax.random.PRNGKey(0)).shape == (2, 2, 16, 16)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(with_align.loss, has_aux=True))(params, batch, jax.random.PRNGKey(0))
    assert "align_loss" in metrics and float(loss) > float(jax.jit(without.loss)(params, batch, jax.random.PRNGKey(0))[0])
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert 0.0 <= float(metrics["iou"]) <= 1.0


def test_prototype_segmenter_takes_supports_of_another_size():
    batch = toy_batch(support_size=8)
    learner = prototype_segmenter(Conv4(width=8, blocks=2, pooled_blocks=1))
    params = learner.init(jax.random.PRNGKey(0), first_task(batch))
    loss, _ = jax.jit(learner.loss)(params, batch, jax.random.PRNGKey(0))
    assert np.isfinite(float(loss))


def test_siamese_unet_shares_one_encoder_and_reads_the_exemplar():
    batch = toy_batch(support_size=8, queries=1)
    learner = siamese_unet(widths=(4, 8, 8))
    params = learner.init(jax.random.PRNGKey(0), first_task(batch))
    assert set(params) == {"encoder", "match_norm", "decoder"}
    predict = jax.jit(learner.predict)
    logits = predict(params, batch, jax.random.PRNGKey(0))
    assert logits.shape == (2, 1, 16, 16)
    other = batch._replace(support_x=batch.support_x[:, :, ::-1])
    assert not np.allclose(logits, predict(params, other, jax.random.PRNGKey(0)))


@pytest.mark.parametrize("make, body, head", [
    (lambda **o: siamese_unet(widths=(4, 8, 8), **o), ("encoder", "block0", "conv0"), ("decoder", "head")),
    (lambda **o: prototype_segmenter(UNet((4, 8), outputs=8), **o), ("encoder", "block0", "conv0"), None)])
def test_contrast_couples_the_tasks_of_a_batch(make, body, head):
    """The contrastive term is InfoNCE over the batch: added to the mean task loss, exactly ln(T) when every
    support code matches every target equally, and a gradient for the features only."""
    batch = toy_batch(tasks=4, support_size=8, queries=1)
    plain, contrastive = make(), make(contrast_weight=1.0)
    params = plain.init(jax.random.PRNGKey(0), first_task(batch))
    key = jax.random.PRNGKey(0)
    loss, metrics = jax.jit(contrastive.loss)(params, batch, key)
    base, base_metrics = jax.jit(plain.loss)(params, batch, key)
    assert "contrast_loss" not in base_metrics
    np.testing.assert_allclose(loss, base + metrics["contrast_loss"], rtol=1e-5)
    assert 0 <= float(metrics["contrast_accuracy"]) <= 1
    same = jax.tree.map(lambda x: np.repeat(x[:1], 4, 0), batch)  # one task four times: all similarities equal
    same = same._replace(classes=np.arange(4, dtype=np.int32))  # ... under four class labels: all negatives
    _, same_metrics = jax.jit(contrastive.loss)(params, same, key)
    np.testing.assert_allclose(same_metrics["contrast_loss"], np.log(4), rtol=1e-5)
    grads = jax.jit(jax.grad(lambda p: contrastive.loss(p, batch, key)[0] - plain.loss(p, batch, key)[0]))(params)
    leaf = lambda tree, path: tree[path[0]] if len(path) == 1 else leaf(tree[path[0]], path[1:])
    assert float(jnp.abs(leaf(grads, body)["kernel"]).max()) > 0
    if head:
        assert float(jnp.abs(leaf(grads, head)["kernel"]).max()) == 0  # the term reads the encoder only


def test_contrast_does_not_count_tasks_of_the_same_class_as_negatives():
    """Two tasks of one class with the same codes: their targets are the same object, so that pair costs nothing
    (not log 2 per task) and both count as right; the masked logits leave the gradients finite."""
    batch = toy_batch(tasks=4)._replace(classes=np.array([0, 1, 2, 2], np.int32))
    codes = jnp.eye(4)  # a perfect encoder: one code per class

    def terms(params, task, rng):
        return jnp.zeros(()), {}, params[task.classes], params[task.classes]

    loss = contrastive_batch_loss(terms, "vmap", 1.0, 0.1)
    _, metrics = jax.jit(loss)(codes, batch, jax.random.PRNGKey(0))
    assert float(metrics["contrast_loss"]) < 1e-3 and float(metrics["contrast_accuracy"]) == 1.0
    grads = jax.jit(jax.grad(lambda c: loss(c, batch, jax.random.PRNGKey(0))[0]))(codes)
    assert np.isfinite(grads).all()


class PixelFeatures(nn.Module):
    """The image itself as features (times a parameter of 1): prototypes are pooled pixels, checkable in numpy."""

    @nn.compact
    def __call__(self, x):
        return x * self.param("one", nn.initializers.ones, ())


def test_k_shot_prototypes_average_one_prototype_per_shot_as_panet():
    """PANet's prototype is the mean of each shot's masked average: every shot counts alike, whatever its object's
    area (pooling all shots' pixels together would let the 36-pixel object outweigh the 2-pixel one), and an empty
    shot adds zeros."""
    rng = np.random.default_rng(0)
    masks = np.zeros((1, 4, 8, 8), np.float32)
    masks[0, 0, :6, :6], masks[0, 1, :2, :2], masks[0, 2, 3, 3:5] = 1, 1, 1  # areas 36, 4, 2; shot 3 empty
    batch = toy_batch(tasks=1, shots=4, queries=1, size=8)._replace(
        support_x=rng.random((1, 4, 8, 8, 3), np.float32), support_mask=masks)
    learner = prototype_segmenter(PixelFeatures(), scale=20.0)
    params = learner.init(jax.random.PRNGKey(0), first_task(batch))
    logits = jax.jit(learner.predict)(params, batch, jax.random.PRNGKey(0))[0, 0]

    x, query = batch.support_x[0].astype(np.float64), batch.query_x[0, 0].astype(np.float64)
    prototype = lambda w: np.mean([(x[k] * w[k, ..., None]).sum((0, 1)) / max(w[k].sum(), 1e-6) for k in range(4)], 0)
    cos = lambda f, p: f @ p / (np.linalg.norm(f, axis=-1) * np.linalg.norm(p))
    want = 20.0 * (cos(query, prototype(masks[0])) - cos(query, prototype(1 - masks[0])))
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)


def test_maml_segmenter_adapts_and_differentiates_through_the_inner_loop():
    batch = toy_batch(tasks=2, size=8)
    learner = maml_segmenter(widths=(4, 8), im2col=False, inner_steps=1, inner_lr=0.5, dice_weight=0.0)
    params = learner.init(jax.random.PRNGKey(0), first_task(batch))
    unadapted = maml_segmenter(widths=(4, 8), im2col=False, inner_steps=1, test_inner_steps=0)
    key = jax.random.PRNGKey(0)
    assert not np.allclose(jax.jit(learner.predict)(params, batch, key), jax.jit(unadapted.predict)(params, batch, key))
    grad = lambda l: jax.jit(jax.grad(lambda p: l.loss(p, batch, key)[0]))(params)
    second = grad(learner)
    first = grad(maml_segmenter(widths=(4, 8), im2col=False, inner_steps=1, inner_lr=0.5, dice_weight=0.0, first_order=True))
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(second))
    difference = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)))
    assert difference > 1e-6  # second order is not first order


def test_meta_sgd_rates_are_parameters():
    batch = toy_batch(tasks=1, size=8)
    learner = maml_segmenter(widths=(4, 8), im2col=False, inner_steps=1, learn_inner_lr=True)
    params = learner.init(jax.random.PRNGKey(0), first_task(batch))
    grads = jax.jit(jax.grad(lambda p: learner.loss(p, batch, jax.random.PRNGKey(0))[0]))(params)
    assert jax.tree.structure(params["inner_lr"]) == jax.tree.structure(params["unet"])
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["inner_lr"]))


def test_miou_counts_every_class_id_a_fixed_set_holds():
    """A fixed set may come from other classes than a run's held-out ones: no id is dropped from mIoU."""
    from fsl_jax.data.segmentation import FixedEpisodes
    from fsl_jax.learner import Learner
    from fsl_jax.seg.evaluation import evaluate_segmentation

    batch = toy_batch(tasks=3)._replace(classes=np.array([5, 300, 5], np.int32))
    bright = Learner(init=lambda rng, task: {}, task_loss=None,
                     task_predict=lambda params, task, rng: task.query_x[..., 0] - 0.5)  # the squares exactly
    result = evaluate_segmentation(bright, {}, FixedEpisodes(batch, 3), 3, 0.5, progress=False)
    assert result["iou"] == result["miou"] == 1.0


def test_evaluation_keeps_the_pixels_above_the_threshold():
    """The squares at p = 0.4: missed at p > 0.5, found at p > 0.3 (the clutter protocol's); each threshold its
    own compiled function, and the threshold in the result."""
    from fsl_jax.data.segmentation import FixedEpisodes
    from fsl_jax.learner import Learner
    from fsl_jax.seg.evaluation import evaluate_segmentation

    unsure = Learner(init=lambda rng, task: {}, task_loss=None,
                     task_predict=lambda params, task, rng: jnp.where(task.query_x[..., 0] > 0.5, np.log(0.4 / 0.6), -9.0))
    sampler = FixedEpisodes(toy_batch(tasks=2), 2)
    at_half, at_03 = (evaluate_segmentation(unsure, {}, sampler, 2, t, progress=False) for t in (0.5, 0.3))
    assert (at_half["iou"], at_half["threshold"]) == (0.0, 0.5) and (at_03["iou"], at_03["threshold"]) == (1.0, 0.3)


def test_training_metrics_count_the_pixels_above_the_threshold():
    """Logits at p = 0.4 on the object: no overlap at p > 0.5, all of it at p > 0.3."""
    from fsl_jax.seg.common import segmentation_loss

    masks = jnp.zeros((2, 8, 8)).at[:, 2:5, 2:5].set(1.0)
    logits = jnp.where(masks > 0, np.log(0.4 / 0.6), -9.0)
    at_half, at_03 = (segmentation_loss(logits, masks, threshold=t) for t in (0.5, 0.3))
    assert float(at_half[1]["iou"]) == 0.0 and float(at_03[1]["iou"]) == 1.0 and at_half[0] == at_03[0]


def test_segmenter_options_are_checked_when_built():
    from fsl_jax.errors import ConfigError

    for make, message in [(lambda: prototype_segmenter(UNet(widths=(4, 8)), scale=0), "scale must be a positive number"),
                          (lambda: siamese_unet(contrast_weight=1.0, temperature=0.0), "temperature must be a positive number"),
                          (lambda: prototype_segmenter(UNet(widths=(4, 8)), align_weight=-0.5), "align_weight must be a number of at least 0"),
                          (lambda: maml_segmenter(threshold=1.0), "threshold must be a probability between 0 and 1")]:
        with pytest.raises(ConfigError, match=message):
            make()
    one_channel = prototype_segmenter(UNet(widths=(4, 8), outputs=1))  # cosines of +-1: every logit 0
    with pytest.raises(ConfigError, match="needs features of at least 2 channels, its backbone gives 1"):
        one_channel.init(jax.random.PRNGKey(0), first_task(toy_batch()))
    with pytest.raises(ConfigError, match="unet outputs must be a positive integer, got 0"):
        UNet(widths=(4, 8), outputs=0).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))


def test_a_loss_coupling_the_tasks_is_never_split_over_devices():
    """A contrastive term computed per device would compare each device's tasks only (none, with one task each)."""
    import optax

    from fsl_jax.errors import ConfigError
    from fsl_jax.meta import task_mesh
    from fsl_jax.train import make_train_step

    with pytest.raises(ConfigError, match="couples the tasks of a batch"):
        make_train_step(siamese_unet(widths=(4, 8), contrast_weight=1.0), optax.sgd(0.1), task_mesh())
