"""Gradient-based meta-learners: exact meta-gradients, the variants' defining properties, learning."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fsl_jax.data.episodes import Episode, EpisodeSampler
from fsl_jax.errors import ConfigError
from fsl_jax.learner import first_task
from fsl_jax.meta import adapt, maml, param_mask, reptile
from fsl_jax.meta.maml import MetaClassifier, softmax_cross_entropy
from fsl_jax.methods import METHODS
from fsl_jax.nets import Conv4
from fsl_jax.train import make_train_step

TINY_CONV4 = Conv4(width=4, blocks=2)


def random_batch(tasks=2, ways=3, shots=2, queries=2, size=8, seed=0) -> Episode:
    rng = np.random.default_rng(seed)
    labels = lambda per: np.tile(np.repeat(np.arange(ways, dtype=np.int32), per), (tasks, 1))
    return Episode(rng.random((tasks, ways * shots, size, size, 1), np.float32), labels(shots),
                   rng.random((tasks, ways * queries, size, size, 1), np.float32), labels(queries),
                   np.tile(np.arange(ways, dtype=np.int32), (tasks, 1)))


def flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def relative_error(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_second_order_meta_gradient_matches_finite_differences_in_float64():
    """d(query loss after 2 inner steps)/d(init), every coordinate, against central differences."""
    with jax.enable_x64(True):
        task = jax.tree.map(lambda x: x.astype(np.float64) if x.dtype == np.float32 else x, first_task(random_batch()))
        losses = {order: maml(TINY_CONV4, inner_steps=2, inner_lr=0.1, first_order=order) for order in (False, True)}
        params = jax.tree.map(lambda p: p.astype(jnp.float64), losses[False].init(jax.random.PRNGKey(0), task))
        vector, unflatten = jax.flatten_util.ravel_pytree(params)
        loss_of = jax.jit(lambda v: losses[False].task_loss(unflatten(v), task, None)[0])
        eps = 1e-6
        basis = eps * jnp.eye(vector.size)
        numeric = (jax.vmap(loss_of)(vector + basis) - jax.vmap(loss_of)(vector - basis)) / (2 * eps)
        grad = {order: flat(jax.jit(jax.grad(lambda p, l=learner: l.task_loss(p, task, None)[0]))(params))
                for order, learner in losses.items()}
        errors = {order: relative_error(g, numeric) for order, g in grad.items()}
        gap = relative_error(grad[True], grad[False])
    assert vector.size > 200 and numeric.dtype == jnp.float64
    assert errors[False] < 1e-3, errors
    # The first-order gradient is a different vector: it fails the same check by far.
    assert errors[True] > 3e-2 and gap > 3e-2, (errors, gap)


def test_adapt_is_sgd_for_any_model_and_loss():
    """Two SGD steps of least squares on a linear model, by hand; steps=0 is the identity."""
    x = jnp.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]])
    y = jnp.array([1.0, 0.0, 2.0])
    params = {"w": jnp.array([0.1, -0.2]), "b": jnp.array(0.3)}
    apply_fn = lambda p, inputs: inputs @ p["w"] + p["b"]
    mse = lambda out, target: jnp.mean((out - target) ** 2)
    adapted, losses = adapt(apply_fn, mse, params, (x, y), steps=2, lr=0.05)
    expected = params
    for _ in range(2):
        grads = jax.grad(lambda p: mse(apply_fn(p, x), y))(expected)
        expected = jax.tree.map(lambda p, g: p - 0.05 * g, expected, grads)
    np.testing.assert_allclose(flat(adapted), flat(expected), rtol=1e-6)
    assert losses.shape == (2,) and losses[1] < losses[0]
    same, none = adapt(apply_fn, mse, params, (x, y), steps=0, lr=0.05)
    assert same is params and none.shape == (0,)
    per_leaf, _ = adapt(apply_fn, mse, params, (x, y), steps=1, lr={"w": 0.0, "b": 0.05})
    np.testing.assert_array_equal(per_leaf["w"], params["w"])
    assert per_leaf["b"] != params["b"]


def test_adapt_rejects_bad_options_by_name():
    params = {"w": jnp.ones(2)}
    apply_fn, loss = (lambda p, x: x @ p["w"]), (lambda out, y: jnp.mean(out))
    support = (jnp.ones((3, 2)), None)
    with pytest.raises(ConfigError, match="steps"):
        adapt(apply_fn, loss, params, support, steps=-1, lr=0.1)
    with pytest.raises(ConfigError, match="lr"):
        adapt(apply_fn, loss, params, support, steps=1, lr={"v": 0.1})
    with pytest.raises(ConfigError, match="mask"):
        adapt(apply_fn, loss, params, support, steps=1, lr=0.1, mask=[True])
    with pytest.raises(ConfigError, match="adapted"):
        maml(TINY_CONV4, adapted="body")
    with pytest.raises(ConfigError, match="batch_stats"):
        maml(TINY_CONV4, batch_stats="running")
    with pytest.raises(ConfigError, match="test_inner_steps"):
        reptile(TINY_CONV4, test_inner_steps=-2)
    for bad in (-0.4, 0, float("nan"), "0.4"):
        with pytest.raises(ConfigError, match="inner_lr must be a positive number"):
            maml(TINY_CONV4, inner_lr=bad)


def test_a_trained_head_is_refused_episodes_of_other_ways():
    """MAML's head has as many outputs as training ways: other episodes get an error naming both."""
    learner = maml(TINY_CONV4, inner_steps=1)
    params = learner.init(jax.random.PRNGKey(0), first_task(random_batch(ways=3)))
    assert learner.predict(params, random_batch(ways=3), jax.random.PRNGKey(0)).shape[-1] == 3
    with pytest.raises(ConfigError, match="head has 3 outputs, so it classifies 3-way episodes only, not 4-way"):
        learner.predict(params, random_batch(ways=4), jax.random.PRNGKey(0))


def test_anil_adapts_the_head_only_but_meta_learns_the_body():
    task = first_task(random_batch())
    model = MetaClassifier(TINY_CONV4, 3)
    params = model.init(jax.random.PRNGKey(0), task.support_x)["params"]
    head_only = param_mask(params, lambda path, _: path.startswith("['head']"))
    adapted, _ = jax.jit(lambda p: adapt(lambda q, x: model.apply({"params": q}, x), softmax_cross_entropy, p,
                                         (task.support_x, task.support_y), steps=3, lr=0.5, mask=head_only))(params)
    for before, after in zip(jax.tree.leaves(params["backbone"]), jax.tree.leaves(adapted["backbone"])):
        np.testing.assert_array_equal(before, after)
    assert float(jnp.abs(adapted["head"]["kernel"] - params["head"]["kernel"]).max()) > 1e-3

    anil = METHODS["anil"](TINY_CONV4, inner_steps=3, test_inner_steps=3, inner_lr=0.5)
    meta_params = anil.init(jax.random.PRNGKey(0), task)
    # ANIL's learner adapts the head on features computed once: the same as the masked loop.
    np.testing.assert_allclose(jax.jit(anil.task_predict)(meta_params, task, None),
                               model.apply({"params": adapted}, task.query_x), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda p: anil.task_loss(p, task, None)[0]))(meta_params)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["model"]["backbone"]))


def test_meta_sgd_learning_rates_receive_gradients_and_move():
    batch = random_batch()
    learner = METHODS["metasgd"](TINY_CONV4, inner_steps=2, inner_lr=0.1)
    params = learner.init(jax.random.PRNGKey(0), first_task(batch))
    assert jax.tree.structure(params["inner_lr"]) == jax.tree.structure(params["model"])
    optimiser = optax.sgd(0.01)
    new, *_ = make_train_step(learner, optimiser)(params, optimiser.init(params), batch, jax.random.PRNGKey(0))
    # SGD: each rate moved by -0.01 * its meta-gradient, which is finite and non-zero except for
    # the convolution biases, which the following BatchNorm cancels (their gradients are all 0).
    moved = jax.tree_util.tree_map_with_path(lambda path, old, now: (jax.tree_util.keystr(path), old, now),
                                             params["inner_lr"], new["inner_lr"])
    for path, old, now in jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple)):
        assert bool(jnp.all(jnp.isfinite(now)))
        assert (float(jnp.abs(now - old).max()) > 0) == ("conv" not in path or "kernel" in path), path


def test_meta_sgd_with_anil_learns_rates_for_the_head_only():
    learner = maml(TINY_CONV4, adapted="head", learn_inner_lr=True)
    params = learner.init(jax.random.PRNGKey(0), first_task(random_batch()))
    assert params["inner_lr"]["backbone"] == jax.tree.map(lambda _: None, params["model"]["backbone"])
    assert jax.tree.structure(params["inner_lr"]["head"]) == jax.tree.structure(params["model"]["head"])


def test_reptile_one_task_one_step_is_sgd_scaled_by_the_outer_rate():
    """Outer SGD(eps) on Reptile's surrogate == plain SGD with rate eps * inner_lr on the support loss."""
    batch = random_batch(tasks=1)
    task = first_task(batch)
    learner = reptile(TINY_CONV4, inner_steps=1, inner_lr=0.3)
    params = learner.init(jax.random.PRNGKey(0), task)
    eps = 0.5
    optimiser = optax.sgd(eps)
    new, _, loss, _ = make_train_step(learner, optimiser)(params, optimiser.init(params), batch, jax.random.PRNGKey(0))
    model = MetaClassifier(TINY_CONV4, 3)
    support_loss = lambda p: softmax_cross_entropy(model.apply({"params": p}, task.support_x), task.support_y)
    grads = jax.jit(jax.grad(support_loss))(params["model"])
    expected = jax.tree.map(lambda p, g: p - eps * 0.3 * g, params["model"], grads)
    np.testing.assert_allclose(flat(new["model"]), flat(expected), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(flat(new["model"]) - flat(params["model"])).max()) > 1e-4
    # The reported loss is the query loss after adaptation, not the surrogate (which is 0).
    adapted = jax.tree.map(lambda p, g: p - 0.3 * g, params["model"], grads)
    query = softmax_cross_entropy(model.apply({"params": adapted}, task.query_x), task.query_y)
    np.testing.assert_allclose(float(loss), float(query), rtol=1e-5)


def test_vmap_lax_map_and_unrolled_tasks_agree():
    batch = random_batch(tasks=3)
    results = []
    for how in ("vmap", "map", "unroll"):
        learner = maml(TINY_CONV4, inner_steps=2, task_map=how)
        params = learner.init(jax.random.PRNGKey(0), first_task(batch))
        results.append(jax.jit(jax.value_and_grad(lambda p, l=learner: l.loss(p, batch, jax.random.PRNGKey(0))[0]))(params))
    for loss, grads in results[1:]:
        np.testing.assert_allclose(results[0][0], loss, rtol=1e-5)
        np.testing.assert_allclose(flat(results[0][1]), flat(grads), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch_stats, independent", [("support", True), ("query", False)])
def test_batch_stats_choice_decides_whether_queries_interact(batch_stats, independent):
    """"support": a query's logits do not depend on the other queries; "query" (transductive): they do."""
    batch = random_batch(tasks=1, queries=3)
    learner = maml(TINY_CONV4, inner_steps=1, batch_stats=batch_stats)
    params = learner.init(jax.random.PRNGKey(0), first_task(batch))
    changed = batch._replace(query_x=batch.query_x.copy())
    changed.query_x[0, 1:] = 1.0 - changed.query_x[0, 1:]
    predict = jax.jit(learner.predict)
    before, after = (predict(params, b, jax.random.PRNGKey(0))[0, 0] for b in (batch, changed))
    assert bool(jnp.allclose(before, after, rtol=1e-5, atol=1e-6)) == independent


def test_im2col_false_gives_forward_mode_through_the_same_model():
    """``im2col=False`` (XLA's convolutions) has the default backbone's parameters and values, and
    forward mode: its forward-over-reverse Hessian-vector product of the second-order MAML loss
    equals the default model's reverse-over-reverse one (float64), which checks the im2col
    products' custom second derivatives too. The default model has no forward mode on CPU."""
    with jax.enable_x64(True):
        task = jax.tree.map(lambda x: x.astype(np.float64) if x.dtype == np.float32 else x, first_task(random_batch()))
        learners = {im2col: maml(Conv4(width=4, blocks=2, im2col=im2col), inner_steps=1, inner_lr=0.1)
                    for im2col in (True, False)}
        params = learners[True].init(jax.random.PRNGKey(0), task)
        assert jax.tree.all(jax.tree.map(jnp.array_equal, learners[False].init(jax.random.PRNGKey(0), task), params))
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        direction = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)), params)
        grad = {im2col: jax.grad(lambda p, l=learner: l.task_loss(p, task, None)[0]) for im2col, learner in learners.items()}

        def reverse_over_reverse(p, v):
            g, pullback = jax.vjp(grad[True], p)
            return g, pullback(v)[0]  # v^T H = H v: the Hessian is symmetric

        forward = jax.jit(lambda p, v: jax.jvp(grad[False], (p,), (v,)))(params, direction)
        reverse = jax.jit(reverse_over_reverse)(params, direction)
        for ours, reference in zip(forward, reverse):  # the meta-gradients, then the Hessian-vector products
            np.testing.assert_allclose(flat(ours), flat(reference), rtol=1e-8)
            assert float(jnp.linalg.norm(flat(reference))) > 1e-3
        if jax.default_backend() == "cpu":
            with pytest.raises(TypeError, match="forward-mode"):
                jax.jvp(grad[True], (params,), (direction,))


@pytest.mark.slow
def test_maml_learns_omniglot_5way_1shot(omniglot28):
    """150 steps of second-order MAML (Conv4 of width 32, 5-way 1-shot, 4 tasks per step, one
    inner step) on the training alphabets, tested on 1250 queries of the held-out alphabets.

    Chance is 20%; the untrained initialisation, adapted with 3 steps, gets 38% (transductive
    BatchNorm helps); after training, 75% (measured on the 2-core CPU, about 90 s). We require
    60% and a gain of 20 points over the untrained model.
    """
    from fsl_jax.data.omniglot import split

    train_chars, test_chars = split(omniglot28)
    learner = maml(Conv4(width=32), inner_steps=1, test_inner_steps=3, inner_lr=0.4)
    sampler = EpisodeSampler(train_chars, 5, 1, 5, tasks=4, seed=0)
    params = learner.init(jax.random.PRNGKey(0), first_task(sampler.sample(0)))
    test = EpisodeSampler(test_chars, 5, 1, 5, tasks=50, seed=1).sample(0)
    predict = jax.jit(learner.predict)
    accuracy = lambda p: float(jnp.mean(jnp.argmax(predict(p, test, jax.random.PRNGKey(0)), -1) == test.query_y))
    untrained = accuracy(params)
    optimiser = optax.adam(3e-3)
    state = optimiser.init(params)
    step = make_train_step(learner, optimiser)
    for i in range(150):
        params, state, loss, _ = step(params, state, sampler.sample(i), jax.random.PRNGKey(i))
    trained = accuracy(params)
    assert trained > 0.6 and trained > untrained + 0.2, (untrained, trained)


@pytest.mark.parametrize("learn_inner_lr", [False, True])
def test_float64_mode_keeps_a_float32_model_in_float32(learn_inner_lr):
    """With ``jax_enable_x64`` on, float32 data and a freshly initialised model train in float32:
    every parameter and meta-gradient stays float32 (BatchNorm's parameters came out float64 and the
    im2col products' gradients float64, which broke the inner loop's scan)."""
    with jax.enable_x64(True):
        task = first_task(random_batch())
        learner = maml(TINY_CONV4, inner_steps=2, inner_lr=0.1, learn_inner_lr=learn_inner_lr, unroll=1)
        params = learner.init(jax.random.PRNGKey(0), task)
        (loss, _), grads = jax.jit(jax.value_and_grad(lambda p: learner.task_loss(p, task, None), has_aux=True))(params)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    assert {x.dtype for x in jax.tree.leaves((params, grads))} == {jnp.dtype(jnp.float32)}
