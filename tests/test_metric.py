"""The metric learners: shapes, exact formulas where they exist, and that each one learns."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fsl_jax.data.episodes import EpisodeSampler
from fsl_jax.errors import ConfigError, DataError
from fsl_jax.learner import first_task
from fsl_jax.metric import matching, protonet, relation, siamese, transfer
from fsl_jax.metric.transfer import fit_linear_head
from fsl_jax.nets import Conv4

SMALL = Conv4(width=16)


def _learners(num_classes):
    return {
        "protonet": protonet(SMALL),
        "protonet-cosine": protonet(SMALL, distance="cosine"),
        "matching": matching(SMALL),
        "matching-fce": matching(SMALL, full_context=True, fce_steps=2),
        "relation": relation(Conv4(width=16, pooled_blocks=2), width=16),
        "siamese": siamese(SMALL),
        "siamese-contrastive": siamese(SMALL, loss="contrastive"),
        "transfer": transfer(SMALL, num_train_classes=num_classes, head_steps=50, head_lr=0.1),
    }


@pytest.mark.parametrize("name", list(_learners(12)))
def test_learner_learns_tiny_task(tiny_chars, name):
    """Each learner goes from chance to clearly better on 5-way 1-shot synthetic episodes in 30 steps."""
    learner = _learners(tiny_chars.num_classes)[name]
    sampler = EpisodeSampler(tiny_chars, ways=5, shots=1, queries=3, tasks=2, seed=0)
    params = learner.init(jax.random.PRNGKey(0), first_task(sampler.sample(0)))
    optimiser = optax.adam(3e-3)
    opt_state = optimiser.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        (loss, metrics), grads = jax.value_and_grad(learner.loss, has_aux=True)(params, batch, jax.random.PRNGKey(1))
        updates, opt_state = optimiser.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    predict = jax.jit(learner.predict)
    held = [sampler.sample(10_000 + i) for i in range(4)]
    acc = lambda p: np.mean([np.mean(np.argmax(predict(p, b, jax.random.PRNGKey(2)), -1) == b.query_y) for b in held])
    logits = predict(params, held[0], jax.random.PRNGKey(2))
    assert logits.shape == (2, 15, 5) and bool(jnp.all(jnp.isfinite(logits)))
    first_loss = None
    for i in range(30):
        params, opt_state, loss = step(params, opt_state, sampler.sample(i))
        first_loss = float(loss) if first_loss is None else first_loss
    assert float(loss) < first_loss
    assert acc(params) > 0.6  # chance is 0.2


def test_protonet_logits_are_negative_squared_distances_to_class_means(tiny_chars):
    learner = protonet(SMALL)
    task = first_task(EpisodeSampler(tiny_chars, ways=3, shots=2, queries=2, seed=0).sample(0))
    params = learner.init(jax.random.PRNGKey(0), task)
    logits = np.asarray(learner.task_predict(params, task, None))
    images = np.concatenate([task.support_x, task.query_x])
    features = np.asarray(SMALL.apply({"params": params}, images)).reshape(len(images), -1)
    support, query = features[:6], features[6:]
    prototypes = np.stack([support[task.support_y == c].mean(0) for c in range(3)])
    expected = -((query[:, None] - prototypes[None]) ** 2).sum(-1)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-3)


def test_protonet_cosine_logits_are_scaled_cosines(tiny_chars):
    task = first_task(EpisodeSampler(tiny_chars, ways=3, shots=2, queries=2, seed=0).sample(0))
    params = protonet(SMALL, distance="cosine").init(jax.random.PRNGKey(0), task)
    ten, three = (np.asarray(protonet(SMALL, distance="cosine", scale=s).task_predict(params, task, None)) for s in (10.0, 3.0))
    assert np.abs(ten).max() <= 10.0 + 1e-5
    np.testing.assert_allclose(three, 0.3 * ten, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="scale"):
        protonet(SMALL, distance="cosine", scale=0.0)


def test_siamese_prediction_takes_the_best_shot(tiny_chars):
    learner = siamese(SMALL, loss="contrastive")
    task = first_task(EpisodeSampler(tiny_chars, ways=3, shots=2, queries=1, seed=0).sample(0))
    params = learner.init(jax.random.PRNGKey(0), task)
    logits = np.asarray(learner.task_predict(params, task, None))
    images = np.concatenate([task.support_x, task.query_x])
    features = np.asarray(SMALL.apply({"params": params["backbone"]}, images)).reshape(len(images), -1)
    d = np.sqrt(((features[6:, None] - features[None, :6]) ** 2).sum(-1))
    expected = np.stack([(-d[:, task.support_y == c]).max(-1) for c in range(3)], -1)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_linear_head_separates_separable_features():
    features = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    onehot = jnp.eye(2)[jnp.array([0, 1, 0, 1])]
    w, b = fit_linear_head(features, onehot, steps=100, learning_rate=0.1)
    assert np.array_equal(np.argmax(features @ w + b, -1), [0, 1, 0, 1])


def test_transfer_prediction_ignores_the_pretraining_head(tiny_chars):
    learner = transfer(SMALL, num_train_classes=12, head_steps=10)
    task = first_task(EpisodeSampler(tiny_chars, ways=3, shots=1, queries=2, seed=0).sample(0))
    params = learner.init(jax.random.PRNGKey(0), task)
    other = {**params, "head": jax.tree.map(jnp.zeros_like, params["head"])}
    np.testing.assert_allclose(learner.task_predict(params, task, None), learner.task_predict(other, task, None))


@pytest.mark.parametrize("factory, kwargs", [(protonet, {"distance": "manhattan"}), (siamese, {"loss": "hinge"})])
def test_bad_method_options_are_named(factory, kwargs):
    with pytest.raises(ConfigError, match=list(kwargs.values())[0]):
        factory(SMALL, **kwargs)


def test_images_too_small_for_the_pooling_are_named():
    """At 14x14 Conv4's fourth pooling would leave a 0x0 map: features of nothing, a model at chance."""
    with pytest.raises(DataError, match="a 1x1 feature map is too small to max-pool by 2"):
        SMALL.init(jax.random.PRNGKey(0), jnp.zeros((2, 14, 14, 1)))
    assert SMALL.apply(SMALL.init(jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 1))), jnp.zeros((2, 16, 16, 1))).shape == (2, 1, 1, 16)


def test_init_gives_parameters_only():
    """BatchNorm records statistics only when asked (mutable=["norm_stats"]): from init, net.apply(variables, x)
    would normalise every later batch with the init batch's statistics."""
    x = jnp.asarray(np.random.default_rng(0).random((4, 28, 28, 1)), jnp.float32)
    variables = SMALL.init(jax.random.PRNGKey(0), x)
    assert set(variables) == {"params"}
    np.testing.assert_allclose(SMALL.apply(variables, 3 * x), SMALL.apply(variables, x), atol=1e-4)  # own statistics


def test_resnet12_feature_map_and_frozen_statistics(tiny_chars):
    from fsl_jax.nets import ResNet12

    net = ResNet12(widths=(8, 16, 16, 32))
    x = jnp.asarray(tiny_chars.images[:4, 0, ..., None])
    variables = net.init(jax.random.PRNGKey(0), x)
    assert net.apply(variables, x).shape == (4, 1, 1, 32)
    # statistics recorded on one batch, then reused: a single image gives the same output
    # as it did inside that batch
    out, stats = net.apply(variables, x, mutable=["norm_stats"])
    single = net.apply({**variables, **stats}, x[:1])
    np.testing.assert_allclose(single, out[:1], rtol=1e-5, atol=1e-5)


def test_a_module_with_flax_batchnorm_is_refused_with_the_remedy(tiny_chars):
    """A learner's parameters are its whole state: flax.linen.BatchNorm's running averages would be
    dropped and its apply would fail deep inside Flax, so init names the fix instead."""
    import flax.linen as nn

    class Own(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False)(nn.Dense(8)(x.reshape(*x.shape[:-3], -1)))

    task = first_task(EpisodeSampler(tiny_chars, ways=3, shots=1, queries=1, seed=0).sample(0))
    with pytest.raises(ConfigError, match=r"\['batch_stats'\].*fsl_jax.nets.BatchNorm"):
        protonet(Own()).init(jax.random.PRNGKey(0), task)
