"""Layers shared by the backbones and decoders."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn

from fsl_jax.errors import DataError


class BatchNorm(nn.Module):
    """Batch normalisation with the statistics of the current batch (Ioffe and Szegedy, 2015).

    Few-shot learners normalise each episode with its own statistics, the transductive
    convention of MAML (Finn et al., 2017) and most episodic methods, so the only state is
    the ``scale`` and ``bias`` parameters: the parameter pytree is the whole model.

    Deployment needs fixed statistics: applying with ``mutable=["norm_stats"]`` records the
    statistics of a reference batch (the support set, say), and any later ``apply`` that is
    given that ``norm_stats`` collection uses them instead of the batch's own.
    """

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, moments=None):
        inv, offset = self.coefficients(x, moments)
        return x * inv + offset

    def coefficients(self, x, moments=None):
        """``(inv, offset)`` per channel, the normalisation being ``x * inv + offset``.

        ``moments``: ``None``, or a function of no arguments that returns the per-channel mean and
        mean square of ``x`` over all its other axes computed more cheaply than from ``x`` itself
        (a :class:`Conv`'s, with ``moments=True``); it is called only where the batch's own
        statistics are used.
        """
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        if self.has_variable("norm_stats", "mean") and not self.is_mutable_collection("norm_stats"):
            mean = self.get_variable("norm_stats", "mean")
            var = self.get_variable("norm_stats", "var")
        else:
            axes = tuple(range(x.ndim - 1))
            mean, mean_square = moments() if moments else (jnp.mean(x, axes), jnp.mean(jnp.square(x), axes))
            var = jnp.maximum(mean_square - jnp.square(mean), 0.0)
            if self.is_mutable_collection("norm_stats") and not self.is_initializing():  # init: parameters only
                self.put_variable("norm_stats", "mean", mean)
                self.put_variable("norm_stats", "var", var)
        inv = jax.lax.rsqrt(var + self.epsilon) * scale
        return inv, bias - mean * inv


class NormReluPool(BatchNorm):
    """``max_pool(relu(BatchNorm(x)))``, computed pooling first: the same values and parameters.

    The normalisation and the ReLU are monotone in each channel (decreasing where a channel's
    scale is negative), so pooling ``x`` (or ``-x``) first and normalising the pooled map gives
    exactly the same values; the affine map, the ReLU and their derivatives of every order then
    touch a quarter of the elements, memory-bound work that is a visible part of a MAML step on
    CPU (``experiments/profile_maml.py``). Gradients agree with the unfused layers except where a
    channel's scale is exactly 0, a kink.
    """

    window: int = 2

    @nn.compact
    def __call__(self, x, moments=None):
        inv, offset = self.coefficients(x, moments)
        sign = jnp.where(inv >= 0, 1, -1).astype(x.dtype)
        return nn.relu(max_pool(x * sign, self.window) * (inv * sign) + offset)


class Conv(nn.Module):
    """Stride-1 ``SAME`` convolution, a drop-in for ``nn.Conv`` (same ``kernel`` [kh, kw, in, out]
    and ``bias`` parameters, same initialisers, so the same values from the same key).

    On CPU it runs as one matrix product over shifted copies of the input (im2col,
    :func:`_im2col_conv`): XLA's CPU convolutions, and above all their gradients, the gradients
    of those, and their ``vmap`` over per-task kernels (which becomes a grouped convolution), are
    several times slower than its matrix products. That is what makes second-order MAML fast on CPU;
    the results agree with ``nn.Conv`` to float rounding. Other backends use
    ``lax.conv_general_dilated`` as ``nn.Conv`` does.

    The gradients of its products and shifts are ``jax.custom_vjp`` rules (:func:`matmul`,
    :func:`shift_stack`), so on CPU this layer has
    reverse-mode derivatives of every order (``jax.grad`` of ``jax.grad``: second-order MAML,
    Hessian-vector products) but no forward mode: ``jax.jvp``, ``jax.jacfwd`` and ``jax.hessian``
    through it fail. Models that need forward mode on CPU take ``im2col=False`` (see :func:`conv`).

    ``moments=True`` returns ``(y, moments)``: ``moments`` is ``None``, or, where the layer is one
    matrix product over full im2col columns (few input channels: Conv4's first layer) and has no
    bias, a function giving the per-channel mean and mean square of ``y`` from the columns' sums
    and their [kh*kw*C, kh*kw*C] Gram matrix, for :class:`BatchNorm`: the batch statistics, their
    gradients and their tangents then never pass over ``y`` (the 28x28x64 activations of every
    query image in a MAML step), only over the far narrower columns.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    use_bias: bool = True
    moments: bool = False

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"Conv needs odd kernel sizes for SAME padding, got {self.kernel_size}")
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features), jnp.float32)
        moments = None
        if jax.default_backend() == "cpu":
            y = _im2col_conv(x, kernel)
            if _full_im2col(kernel.shape) and not self.use_bias:
                moments = functools.partial(_column_moments, x, kernel)
        else:
            y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return (y, moments) if self.moments else y


def conv(features: int, kernel: int, im2col: bool, name: str, use_bias: bool = True) -> nn.Module:
    """A stride-1 SAME convolution: :class:`Conv` (one matrix product on CPU, faster when every task
    has its own kernels, as in MAML's inner loop) or XLA's ``nn.Conv``, which forward-mode
    differentiation (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) also goes through on CPU.
    Both have the same parameters."""
    if im2col:
        return Conv(features, (kernel, kernel), use_bias=use_bias, name=name)
    return nn.Conv(features, (kernel, kernel), padding="SAME", use_bias=use_bias, name=name)


@jax.jit
def _im2col_conv(x, kernel):
    """SAME stride-1 convolution of [..., H, W, C] by a [kh, kw, C, out] kernel as one matrix product.

    Of two ways, the one that writes fewer columns per pixel: full im2col, the kh*kw shifted
    copies of the input times the [kh*kw*C, out] kernel, for narrow inputs (Conv4's first layer,
    C = 1); and for wider ones the kernel's rows apart: the kw horizontal shifts [..., H, W, kw*C]
    times all kh rows of the kernel at once ([kw*C, kh*out]), then the kh row outputs shifted
    vertically and summed. For a 3x3 64->64 layer that is 192 + 192 values per pixel instead of
    576, in the forward pass and in every gradient (which take the same shapes), the most
    memory traffic of a second-order MAML step (``experiments/profile_maml.py``). Same values
    either way, to float rounding. A ``jit`` of this name is what ``bridges`` exports as a Conv2D.
    """
    kh, kw, c, out = kernel.shape
    if (kh, kw) == (1, 1):
        return matmul(x, kernel[0, 0])
    if _full_im2col(kernel.shape):
        return matmul(_columns(x, kh, kw), kernel.reshape(kh * kw * c, out))
    rows, cols = x.ndim - 3, x.ndim - 2
    columns = shift_stack(x, _offsets(kw), cols)
    row_outputs = matmul(columns, kernel.reshape(kh, kw * c, out).transpose(1, 0, 2).reshape(kw * c, kh * out))
    return shift_sum(row_outputs, _offsets(kh), rows)


def _full_im2col(kernel_shape) -> bool:
    """Whether :func:`_im2col_conv` multiplies full im2col columns: where they write fewer values."""
    kh, kw, c, out = kernel_shape
    return (kh, kw) != (1, 1) and kh * out >= (kh - 1) * kw * c


def _columns(x, kh: int, kw: int):
    """The full im2col columns of ``x`` [..., H, W, C] for a SAME kh x kw kernel: [..., H, W, kh*kw*C]."""
    rows, cols = x.ndim - 3, x.ndim - 2
    return shift_stack(shift_stack(x, _offsets(kw), cols), _offsets(kh), rows)


@jax.jit  # like _im2col_conv: a jit takes any array (a NumPy batch under vmap, say) as x
def _column_moments(x, kernel):
    """The per-channel mean and mean square of ``_im2col_conv(x, kernel)`` (full im2col) over all
    its other axes, from the columns: mean = mean(columns) K and mean square = diag(K^T G K), with
    G the columns' Gram matrix over their number, so nothing passes over the convolution's output.

    The columns' mean is a product too (uniform weights times the columns): XLA then gives the
    convolution, the Gram matrix and the mean one [N, kh*kw*C] copy of the columns, where a
    reduction made it write them a second time."""
    kh, kw, c, out = kernel.shape
    columns = _columns(x, kh, kw)
    columns = columns.reshape(-1, columns.shape[-1])
    n = columns.shape[0]
    flat = kernel.reshape(kh * kw * c, out)
    gram = matmul_t(columns, columns) / n
    return jnp.full(n, 1 / n, columns.dtype) @ columns @ flat, jnp.sum((gram @ flat) * flat, 0)


def _offsets(size: int) -> tuple[int, ...]:
    """The taps of a centred kernel of odd ``size``: -size//2 .. size//2."""
    return tuple(range(-(size // 2), size // 2 + 1))


def _shift(x, offset: int, axis: int):
    """``x`` moved along ``axis``: ``out[p] = x[p + offset]``, zeros where that is outside."""
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (max(-offset, 0), max(offset, 0))
    return jax.lax.slice_in_dim(jnp.pad(x, pad), max(offset, 0), max(offset, 0) + n, axis=axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def shift_stack(x, offsets: tuple[int, ...], axis: int):
    """The shifts of ``x`` [..., C] by each offset along ``axis``, side by side: [..., len(offsets)*C].

    This and :func:`shift_sum` are each other's transposes, stated as such (a ``jax.custom_vjp``
    pair): JAX's own transpose of the shifts pads every cotangent block to the full width and adds
    the padded copies, which XLA's CPU backend wrote out in full, the slowest memory-bound work of
    a second-order MAML step (``experiments/profile_maml.py``); this pair writes each gradient once.
    """
    return jnp.concatenate([_shift(x, o, axis) for o in offsets], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def shift_sum(z, offsets: tuple[int, ...], axis: int):
    """The sum over blocks of ``z`` [..., len(offsets)*C], block i shifted by ``offsets[i]`` along ``axis``."""
    blocks = jnp.split(z, len(offsets), -1)
    return sum((_shift(b, o, axis) for b, o in zip(blocks[1:], offsets[1:])), _shift(blocks[0], offsets[0], axis))


def _reversed(offsets):
    return tuple(-o for o in offsets)


shift_stack.defvjp(lambda x, offsets, axis: (shift_stack(x, offsets, axis), None),
                   lambda offsets, axis, _, g: (shift_sum(g, _reversed(offsets), axis),))
shift_sum.defvjp(lambda z, offsets, axis: (shift_sum(z, offsets, axis), None),
                 lambda offsets, axis, _, g: (shift_stack(g, _reversed(offsets), axis),))


@jax.custom_vjp
def matmul(a, b):
    """``a @ b`` for ``a`` [..., K] and ``b`` [K, N], whose gradients (of every order) are
    products that XLA's CPU backend runs without transposing a large operand needlessly.

    The kernel gradient of ``a @ b`` contracts the leading axes of ``a`` and of the output
    gradient. Written as JAX's transpose rule writes it, XLA copied the [B*H*W, 64] output
    gradient of Conv4's first convolution into a transposed layout first
    (``experiments/profile_maml.py`` showed that copy among a MAML step's slowest operations);
    :func:`matmul_t` states the contraction directly and leaves the layout to XLA, and the
    gradients of both call ``matmul`` and ``matmul_t`` again. Same values as ``a @ b``.
    """
    return a @ b


@jax.custom_vjp
def matmul_t(a, c):
    """``a^T c`` over all leading axes, [..., K] x [..., N] -> [K, N].

    The leading axes are merged first: a product over one leading axis runs on XLA's CPU backend
    without the transposed copy of ``a`` that it made for a contraction over several (the
    [14700, 192] columns of Conv4's second convolution, per task, in a MAML step).
    """
    return a.reshape(-1, a.shape[-1]).T @ c.reshape(-1, c.shape[-1])


def _like(gradients, primals):
    """Each gradient in its primal's dtype, as JAX's own rules give them (with float64 enabled a
    float32 kernel met by float64 data would otherwise get a float64 gradient)."""
    return tuple(g.astype(p.dtype) for g, p in zip(gradients, primals))


matmul.defvjp(lambda a, b: (matmul(a, b), (a, b)),
              lambda res, g: _like((matmul(g, res[1].T), matmul_t(res[0], g)), res))
matmul_t.defvjp(lambda a, c: (matmul_t(a, c), (a, c)),
                lambda res, g: _like((matmul(res[1], g.T), matmul(res[0], g)), res))


def max_pool(x, window: int = 2):
    """Non-overlapping max pooling of [..., H, W, C] (floor of odd sizes, as PyTorch's MaxPool2d).

    Written as a reshape and a max rather than ``reduce_window``: the same values, but its
    gradient (and the gradient of that, which second-order MAML needs) is elementwise, where
    ``reduce_window``'s is a slow select-and-scatter.
    """
    h, w, c = x.shape[-3] // window, x.shape[-2] // window, x.shape[-1]
    if h == 0 or w == 0:
        raise DataError(f"a {x.shape[-3]}x{x.shape[-2]} feature map is too small to max-pool by {window}: the images "
                        "are too small for this backbone (raise data.image_size, or pool in fewer blocks)")
    x = x[..., : h * window, : w * window, :]
    return x.reshape(*x.shape[:-3], h, window, w, window, c).max(axis=(-4, -2))
