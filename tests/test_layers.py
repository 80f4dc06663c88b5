"""The backbones' own layers (fsl_jax.nets.layers): each fused or hand-differentiated layer has the
parameters, values, gradients and gradients of gradients of the plain layers it replaces."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fsl_jax.nets import Conv4
from fsl_jax.nets.layers import BatchNorm, Conv, NormReluPool, max_pool


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
