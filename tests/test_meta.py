"""Gradient-based meta-learners: exact meta-gradients, the variants' defining properties, learning."""
from __future__ import annotations

import flax.linen as nn
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
from fsl_jax.nets.layers import BatchNorm, Conv, NormReluPool, max_pool
from fsl_jax.train import make_train_step

TINY = Conv4(width=4, blocks=2)


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
        losses = {order: maml(TINY, inner_steps=2, inner_lr=0.1, first_order=order) for order in (False, True)}
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
        maml(TINY, adapted="body")
    with pytest.raises(ConfigError, match="batch_stats"):
        maml(TINY, batch_stats="running")
    with pytest.raises(ConfigError, match="test_inner_steps"):
        reptile(TINY, test_inner_steps=-2)
    for bad in (-0.4, 0, float("nan"), "0.4"):
        with pytest.raises(ConfigError, match="inner_lr must be a positive number"):
            maml(TINY, inner_lr=bad)


def test_a_trained_head_is_refused_episodes_of_other_ways():
    """MAML's head has as many outputs as training ways: other episodes get an error naming both."""
    learner = maml(TINY, inner_steps=1)
    params = learner.init(jax.random.PRNGKey(0), first_task(random_batch(ways=3)))
    assert learner.predict(params, random_batch(ways=3), jax.random.PRNGKey(0)).shape[-1] == 3
    with pytest.raises(ConfigError, match="head has 3 outputs, so it classifies 3-way episodes only, not 4-way"):
        learner.predict(params, random_batch(ways=4), jax.random.PRNGKey(0))


def test_anil_adapts_the_head_only_but_meta_learns_the_body():
    task = first_task(random_batch())
    model = MetaClassifier(TINY, 3)
    params = model.init(jax.random.PRNGKey(0), task.support_x)["params"]
    head_only = param_mask(params, lambda path, _: path.startswith("['head']"))
    adapted, _ = jax.jit(lambda p: adapt(lambda q, x: model.apply({"params": q}, x), softmax_cross_entropy, p,
                                         (task.support_x, task.support_y), steps=3, lr=0.5, mask=head_only))(params)
    for before, after in zip(jax.tree.leaves(params["backbone"]), jax.tree.leaves(adapted["backbone"])):
        np.testing.assert_array_equal(before, after)
    assert float(jnp.abs(adapted["head"]["kernel"] - params["head"]["kernel"]).max()) > 1e-3

    anil = METHODS["anil"](TINY, inner_steps=3, test_inner_steps=3, inner_lr=0.5)
    meta_params = anil.init(jax.random.PRNGKey(0), task)
    # ANIL's learner adapts the head on features computed once: the same as the masked loop.
    np.testing.assert_allclose(jax.jit(anil.task_predict)(meta_params, task, None),
                               model.apply({"params": adapted}, task.query_x), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda p: anil.task_loss(p, task, None)[0]))(meta_params)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["model"]["backbone"]))


def test_meta_sgd_learning_rates_receive_gradients_and_move():
    batch = random_batch()
    learner = METHODS["metasgd"](TINY, inner_steps=2, inner_lr=0.1)
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
    learner = maml(TINY, adapted="head", learn_inner_lr=True)
    params = learner.init(jax.random.PRNGKey(0), first_task(random_batch()))
    assert params["inner_lr"]["backbone"] == jax.tree.map(lambda _: None, params["model"]["backbone"])
    assert jax.tree.structure(params["inner_lr"]["head"]) == jax.tree.structure(params["model"]["head"])


def test_reptile_one_task_one_step_is_sgd_scaled_by_the_outer_rate():
    """Outer SGD(eps) on Reptile's surrogate == plain SGD with rate eps * inner_lr on the support loss."""
    batch = random_batch(tasks=1)
    task = first_task(batch)
    learner = reptile(TINY, inner_steps=1, inner_lr=0.3)
    params = learner.init(jax.random.PRNGKey(0), task)
    eps = 0.5
    optimiser = optax.sgd(eps)
    new, _, loss, _ = make_train_step(learner, optimiser)(params, optimiser.init(params), batch, jax.random.PRNGKey(0))
    model = MetaClassifier(TINY, 3)
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
        learner = maml(TINY, inner_steps=2, task_map=how)
        params = learner.init(jax.random.PRNGKey(0), first_task(batch))
        results.append(jax.jit(jax.value_and_grad(lambda p, l=learner: l.loss(p, batch, jax.random.PRNGKey(0))[0]))(params))
    for loss, grads in results[1:]:
        np.testing.assert_allclose(results[0][0], loss, rtol=1e-5)
        np.testing.assert_allclose(flat(results[0][1]), flat(grads), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch_stats, independent", [("support", True), ("query", False)])
def test_batch_stats_choice_decides_whether_queries_interact(batch_stats, independent):
    """"support": a query's logits do not depend on the other queries; "query" (transductive): they do."""
    batch = random_batch(tasks=1, queries=3)
    learner = maml(TINY, inner_steps=1, batch_stats=batch_stats)
    params = learner.init(jax.random.PRNGKey(0), first_task(batch))
    changed = batch._replace(query_x=batch.query_x.copy())
    changed.query_x[0, 1:] = 1.0 - changed.query_x[0, 1:]
    predict = jax.jit(learner.predict)
    before, after = (predict(params, b, jax.random.PRNGKey(0))[0, 0] for b in (batch, changed))
    assert bool(jnp.allclose(before, after, rtol=1e-5, atol=1e-6)) == independent


def test_conv_and_max_pool_match_flax_layers():
    """Conv (im2col on CPU) and the reshape max-pool keep nn.Conv / nn.max_pool's params, values
    and gradients, by either product: full im2col (few input channels: 3 in, 20 out) and the
    kernel's rows apart (3 in, 5 out; a 5x3 kernel to tell its rows from its columns)."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 9, 3))
    for features, size, bias in ((5, (3, 3), True), (20, (3, 3), False), (5, (5, 3), False), (5, (1, 1), False)):
        ours, theirs = Conv(features, size, use_bias=bias), nn.Conv(features, size, padding="SAME", use_bias=bias)
        params = theirs.init(jax.random.PRNGKey(0), x)
        assert jax.tree.all(jax.tree.map(jnp.array_equal, ours.init(jax.random.PRNGKey(0), x), params))
        (y, pullback), (expected, reference_pullback) = (jax.vjp(m.apply, params, x) for m in (ours, theirs))
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
        cotangent = jax.random.normal(jax.random.PRNGKey(3), y.shape)
        for got, want in zip(jax.tree.leaves(pullback(cotangent)), jax.tree.leaves(reference_pullback(cotangent))):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    reference = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(max_pool(x), reference(x))
    cotangent = jax.random.normal(jax.random.PRNGKey(2), reference(x).shape)
    np.testing.assert_allclose(jax.vjp(max_pool, x)[1](cotangent)[0], jax.vjp(reference, x)[1](cotangent)[0])


def test_conv4_has_no_bias_because_batchnorm_cancels_it():
    """Conv4's convolutions carry no bias: one before BatchNorm would change nothing, in the
    batch's own statistics and in recorded ones alike."""
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 28, 28, 1))
    params = Conv4().init(jax.random.PRNGKey(1), x)["params"]
    assert all("bias" not in params[f"conv{i}"] for i in range(4))
    conv, norm = Conv(8, (3, 3)), BatchNorm()
    plain = conv.init(jax.random.PRNGKey(2), x)
    biased = {"params": {**plain["params"], "bias": jnp.linspace(-3.0, 5.0, 8)}}
    norm_params = {"params": norm.init(jax.random.PRNGKey(3), conv.apply(plain, x))["params"]}

    def recorded(conv_params):  # statistics recorded on x, applied to two of its images
        _, stats = norm.apply(norm_params, conv.apply(conv_params, x), mutable=["norm_stats"])
        return norm.apply({**norm_params, **stats}, conv.apply(conv_params, x[:2]))

    own = lambda conv_params: norm.apply(norm_params, conv.apply(conv_params, x))
    np.testing.assert_allclose(own(biased), own(plain), atol=1e-4)
    np.testing.assert_allclose(recorded(biased), recorded(plain), atol=1e-4)
    assert not np.allclose(conv.apply(biased, x), conv.apply(plain, x), atol=1e-2)


def test_norm_relu_pool_is_batchnorm_relu_max_pool_to_second_order():
    """``NormReluPool`` pools before it normalises; it has BatchNorm's parameters and statistics,
    and the values, gradients and gradients of gradients of ``max_pool(relu(BatchNorm(x)))``,
    with the batch's own statistics and with recorded ones, for negative scales too (float64; odd
    sizes crop as max_pool does)."""
    fused, norm = NormReluPool(), BatchNorm()
    unfused = lambda variables, x: max_pool(nn.relu(norm.apply(variables, x)))
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 6, 8), jnp.float64)
        params = fused.init(jax.random.PRNGKey(1), x)["params"]
        assert jax.tree.structure(params) == jax.tree.structure(norm.init(jax.random.PRNGKey(1), x)["params"])
        params = {"scale": jnp.linspace(-2.0, 2.0, 8).at[3].set(0.5), "bias": jnp.linspace(0.3, -0.4, 8)}
        _, stats = fused.apply({"params": params}, x, mutable=["norm_stats"])
        _, unfused_stats = norm.apply({"params": params}, x, mutable=["norm_stats"])
        jax.tree.map(np.testing.assert_array_equal, stats, unfused_stats)
        weights = jnp.cos(jnp.arange(3 * 3 * 3 * 8, dtype=jnp.float64)).reshape(3, 3, 3, 8)

        def derivatives(apply, variables):
            f = lambda p, x: jnp.sum(jnp.sin(apply({**variables, "params": p}, x)) * weights)
            g = lambda p, x: sum(jnp.sum(jnp.cos(d)) for d in jax.tree.leaves(jax.grad(f, (0, 1))(p, x)))
            return apply(variables, x), jax.grad(f, (0, 1))(params, x), jax.grad(g, (0, 1))(params, x)

        for variables in ({"params": params}, {"params": params, **stats}):
            ours, reference = derivatives(fused.apply, variables), derivatives(unfused, variables)
            assert np.mean(np.asarray(ours[0]) > 0) > 0.2  # the ReLU passes some and stops others
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12), ours, reference)


def test_conv_moments_are_batchnorm_statistics_to_second_order():
    """``Conv(moments=True)`` gives BatchNorm the statistics of the convolution's output from its
    columns (Conv4's first block): the same values, gradients and gradients of gradients, for
    the parameters and the input, as statistics taken from the output (float64). Layers that are
    not full im2col, or have a bias, offer none."""
    conv, norm = Conv(8, (3, 3), use_bias=False, moments=True), NormReluPool()
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 6, 2), jnp.float64)
        kernel = conv.init(jax.random.PRNGKey(1), x)["params"]["kernel"].astype(jnp.float64)
        params = {"kernel": kernel, "scale": jnp.linspace(-2.0, 2.0, 8), "bias": jnp.linspace(0.3, -0.4, 8)}
        weights = jnp.cos(jnp.arange(3 * 3 * 3 * 8, dtype=jnp.float64)).reshape(3, 3, 3, 8)

        def block(p, x, from_columns):
            y, moments = conv.apply({"params": {"kernel": p["kernel"]}}, x)
            assert moments is not None
            return norm.apply({"params": {"scale": p["scale"], "bias": p["bias"]}}, y, moments if from_columns else None)

        def derivatives(from_columns):
            f = lambda p, x: jnp.sum(jnp.sin(block(p, x, from_columns)) * weights)
            g = lambda p, x: sum(jnp.sum(jnp.cos(d)) for d in jax.tree.leaves(jax.grad(f, (0, 1))(p, x)))
            return block(params, x, from_columns), jax.grad(f, (0, 1))(params, x), jax.grad(g, (0, 1))(params, x)

        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10),
                     derivatives(True), derivatives(False))
    wide, biased = Conv(8, (3, 3), use_bias=False, moments=True), Conv(8, (3, 3), moments=True)
    x = jnp.ones((1, 5, 5, 8))
    assert wide.apply(wide.init(jax.random.PRNGKey(0), x), x)[1] is None  # rows apart, not full im2col
    assert biased.apply(biased.init(jax.random.PRNGKey(0), x[..., :1]), x[..., :1])[1] is None


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


def test_layout_aware_matmul_matches_matmul_to_second_order():
    """``nets.layers.matmul`` only changes how XLA lays out its gradients: the values, gradients
    and gradients of gradients are those of ``a @ b``, for narrow and wide ``a``."""
    from fsl_jax.nets.layers import matmul

    def derivatives(mm, a, b):
        f = lambda a, b: jnp.sum(jnp.sin(mm(a, b)))
        g = lambda a, b: jnp.sum(jnp.square(jax.grad(f, (0, 1))(a, b)[1]))  # a function of a gradient
        return mm(a, b), jax.grad(f, (0, 1))(a, b), jax.grad(g, (0, 1))(a, b)

    with jax.enable_x64(True):
        for k, n in ((3, 8), (8, 3)):
            a = jax.random.normal(jax.random.PRNGKey(0), (2, 5, k), jnp.float64)
            b = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float64)
            jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-12),
                         derivatives(matmul, a, b), derivatives(jnp.matmul, a, b))


def test_shift_pair_matches_plain_shifts_to_second_order():
    """``shift_stack`` and ``shift_sum`` (the convolution's shifted copies, with hand-stated
    transposes) have the values, gradients and gradients of gradients of the same shifts written
    in plain JAX, along either axis, for a centred and an uneven set of offsets."""
    from fsl_jax.nets.layers import _shift, shift_stack, shift_sum

    plain_stack = lambda x, offsets, axis: jnp.concatenate([_shift(x, o, axis) for o in offsets], -1)
    plain_sum = lambda z, offsets, axis: sum(_shift(b, o, axis) for b, o in zip(jnp.split(z, len(offsets), -1), offsets))

    def derivatives(op, x, offsets, axis):
        y = op(x, offsets, axis)
        weights = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)  # every output position counts
        f = lambda x: jnp.sum(jnp.sin(op(x, offsets, axis)) * weights)
        g = lambda x: jnp.sum(jnp.cos(jax.grad(f)(x)) * x)  # a function of a gradient
        return y, jax.grad(f)(x), jax.grad(g)(x)

    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6, 4), jnp.float64)
        for offsets in ((-1, 0, 1), (-2, 0, 1)):
            for axis in (1, 2):
                stacked = jax.random.normal(jax.random.PRNGKey(1), x.shape[:-1] + (4 * len(offsets),), jnp.float64)
                for ours, plain, arg in ((shift_stack, plain_stack, x), (shift_sum, plain_sum, stacked)):
                    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12),
                                 derivatives(ours, arg, offsets, axis), derivatives(plain, arg, offsets, axis))


@pytest.mark.parametrize("learn_inner_lr", [False, True])
def test_float64_mode_keeps_a_float32_model_in_float32(learn_inner_lr):
    """With ``jax_enable_x64`` on, float32 data and a freshly initialised model train in float32:
    every parameter and meta-gradient stays float32 (BatchNorm's parameters came out float64 and the
    im2col products' gradients float64, which broke the inner loop's scan)."""
    with jax.enable_x64(True):
        task = first_task(random_batch())
        learner = maml(TINY, inner_steps=2, inner_lr=0.1, learn_inner_lr=learn_inner_lr, unroll=1)
        params = learner.init(jax.random.PRNGKey(0), task)
        (loss, _), grads = jax.jit(jax.value_and_grad(lambda p: learner.task_loss(p, task, None), has_aux=True))(params)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    assert {x.dtype for x in jax.tree.leaves((params, grads))} == {jnp.dtype(jnp.float32)}
