"""Lower a JAX function to a ``tf.function`` of standard TensorFlow ops (no ``XlaCallModule``).

``jax2tf`` wraps a whole model in one ``XlaCallModule`` op holding StableHLO, which
coremltools cannot read. This module instead walks the function's jaxpr and emits, for each
primitive, the TensorFlow ops that compute it (Conv2D, MatMul, MaxPool, ResizeBilinear, ...),
which coremltools' TensorFlow front end converts to MIL.

Three things keep the graph small and close to what a person would write by hand:

* constant folding: an equation whose inputs are all known (parameters, ``iota``, the
  folded statistics of a BatchNorm) is evaluated with JAX itself at lowering time;
* lazy broadcasting: ``broadcast_in_dim`` only inserts unit axes, and elementwise ops rely
  on TensorFlow's implicit broadcasting; other consumers materialise the full shape;
* ``jax.image.resize`` (a ``jit`` named ``_resize``) becomes ``tf.image.resize`` when a
  probe input shows that the two agree (upsampling with "linear" or "nearest");
* layers written for fast CPU gradients (``fsl_jax.nets.layers``) become the ops they
  compute: an im2col convolution (the ``jit`` named ``_im2col_conv``) a Conv2D, and a max
  over the window axes of a reshape a MaxPool (Core ML allows rank 5 at most).

The lowered graph has fixed input shapes (Core ML models are built for a given batch).
A primitive outside the table raises :class:`UnsupportedPrimitive`, which names the
primitive and where in the model it comes from (module path and source line).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from jax._src import core, source_info_util

from fsl_jax.errors import ExportError


class UnsupportedPrimitive(ExportError, NotImplementedError):
    """A JAX primitive (or one of its settings) that the TensorFlow lowering does not cover."""

    def __init__(self, primitive: str, where: str, detail: str = ""):
        self.primitive, self.where = primitive, where
        why = f" ({detail})" if detail else ""
        super().__init__(f"cannot lower JAX primitive {primitive!r}{why} to TensorFlow ops; it comes from {where}. "
                         f"Supported primitives: {', '.join(sorted(SUPPORTED))}")


def _is_const(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic))


def _transpose(x, perm):
    perm = list(perm)
    if perm == list(range(len(perm))):
        return x
    return np.transpose(x, perm) if _is_const(x) else tf.transpose(x, perm)


def _reshape(x, shape):
    shape = [int(d) for d in shape]
    if list(x.shape) == shape:
        return x
    return np.reshape(x, shape) if _is_const(x) else tf.reshape(x, shape)


def _broadcast(x, shape):
    if tuple(x.shape) == tuple(shape):
        return x
    return np.broadcast_to(x, shape).copy() if _is_const(x) else tf.broadcast_to(x, shape)


# --- elementwise ops: operands may still lack broadcast axes (TensorFlow broadcasts them) ---

def _by_dtype(float_op, int_op, bool_op=None):
    """A binary op whose TensorFlow counterpart depends on the operands' dtype."""
    def op(x, y):
        dtype = np.dtype(x.dtype if _is_const(x) else x.dtype.as_numpy_dtype)
        if dtype == np.bool_:
            return bool_op(x, y)
        return float_op(x, y) if np.issubdtype(dtype, np.floating) else int_op(x, y)
    return op


_BINARY = {
    "add": tf.add, "sub": tf.subtract, "mul": tf.multiply,
    "div": _by_dtype(tf.divide, tf.truncatediv), "rem": _by_dtype(tf.truncatemod, tf.truncatemod),
    "max": tf.maximum, "min": tf.minimum, "pow": tf.pow, "atan2": tf.atan2,
    "eq": tf.equal, "ne": tf.not_equal, "lt": tf.less, "le": tf.less_equal, "gt": tf.greater, "ge": tf.greater_equal,
    "and": _by_dtype(None, tf.bitwise.bitwise_and, tf.logical_and),  # JAX has no float and/or/xor
    "or": _by_dtype(None, tf.bitwise.bitwise_or, tf.logical_or),
    "xor": _by_dtype(None, tf.bitwise.bitwise_xor, tf.math.logical_xor),
}

_UNARY = {
    "neg": tf.negative, "abs": tf.abs, "sign": tf.sign, "floor": tf.floor, "ceil": tf.math.ceil,
    "exp": tf.exp, "exp2": lambda x: tf.pow(tf.constant(2.0, x.dtype), x), "log": tf.math.log,
    "log1p": tf.math.log1p, "expm1": tf.math.expm1, "tanh": tf.tanh, "logistic": tf.sigmoid,
    "sqrt": tf.sqrt, "rsqrt": tf.math.rsqrt, "square": tf.square, "sin": tf.sin, "cos": tf.cos,
    "erf": tf.math.erf, "is_finite": tf.math.is_finite,
    "not": lambda x: tf.logical_not(x) if x.dtype == tf.bool else tf.bitwise.invert(x),
}

# Primitives that only carry a value through (sharding, autodiff or scheduling markers).
_IDENTITY = {"stop_gradient", "copy", "copy_p", "reduce_precision", "optimization_barrier", "sharding_constraint",
             "pvary", "mesh_cast"}

# Primitives whose sub-jaxpr is inlined.
_CALLS = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
          "remat", "checkpoint", "named_call"}


def _integer_pow(x, y: int):
    """x**y by repeated squaring: only multiplications (and a reciprocal for y < 0)."""
    if y == 0:
        return tf.ones_like(x)
    result, base, n = None, x, abs(y)
    while n:
        if n & 1:
            result = base if result is None else result * base
        n >>= 1
        if n:
            base = base * base
    return tf.math.reciprocal(result) if y < 0 else result


def _same_padding(size: int, window: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME padding (low, high) for one spatial axis."""
    effective = (window - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _pad_or_crop(x, pads):
    """Pad (positive) or crop (negative) each axis by (low, high); zeros as fill."""
    crop_begin = [max(-lo, 0) for lo, _ in pads]
    crop_size = [int(d) - max(-lo, 0) - max(-hi, 0) for d, (lo, hi) in zip(x.shape, pads)]
    if any(crop_begin) or any(c != d for c, d in zip(crop_size, x.shape)):
        x = tf.slice(x, crop_begin, crop_size)
    grow = [[max(lo, 0), max(hi, 0)] for lo, hi in pads]
    return tf.pad(x, grow) if any(a or b for a, b in grow) else x


class _Lowering:
    """One walk over a jaxpr, emitting TensorFlow ops inside a ``tf.function`` trace."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.producers: dict = {}  # Var -> the equation that computed it (for the patterns below)
        self.values: dict = {}  # Var -> its value, every scope (Vars are unique across jaxprs)

    # ----- values -----
    def run(self, jaxpr: core.Jaxpr, consts, args, prefix: str = "", site: str = "", outer_vars=()):
        """Emit ``jaxpr``; ``prefix`` and ``site`` (source line) locate the call that inlines it,
        whose operands are ``outer_vars``."""
        env: dict = {}

        def read(v, lazy=False):
            if isinstance(v, core.Literal):
                return np.asarray(v.val, dtype=v.aval.dtype)
            value = env[v]
            return value if lazy else _broadcast(value, v.aval.shape)

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = self.values[v] = np.asarray(c) if not isinstance(c, tf.Tensor) else c
        for v, a in zip(jaxpr.invars, args):
            env[v] = self.values[v] = a
        for v, outer in zip(jaxpr.invars, outer_vars):  # patterns see through the call
            if outer is not None and outer in self.producers:
                self.producers[v] = self.producers[outer]
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            self.counts[name] = self.counts.get(name, 0) + 1
            where = self._where(eqn, prefix, site)
            if name in _CALLS:
                outs = self._call(eqn, [read(v) for v in eqn.invars], prefix, site)
            elif name in _BINARY or name in _UNARY or name == "integer_pow":
                outs = [self._elementwise(eqn, [read(v, lazy=True) for v in eqn.invars])]
            elif name == "broadcast_in_dim":
                outs = [self._broadcast_in_dim(eqn, read(eqn.invars[0], lazy=True))]
            else:
                invals = [read(v) for v in eqn.invars]
                if all(_is_const(x) for x in invals):
                    outs = self._fold(eqn, invals)
                else:
                    rule = _RULES.get(name)
                    if rule is None:
                        raise UnsupportedPrimitive(name, where)
                    outs = rule(self, eqn, invals, where, **eqn.params)
                    outs = outs if isinstance(outs, (list, tuple)) else [outs]
            for v, out in zip(eqn.outvars, outs):
                if not isinstance(v, core.DropVar):
                    env[v] = self.values[v] = out
                    self.producers[v] = eqn
        return [read(v) for v in jaxpr.outvars]

    @staticmethod
    def _path(eqn, prefix: str) -> str:
        """The Flax module path (JAX name stack) of an equation, below ``prefix``."""
        return "/".join(p for p in (prefix, str(eqn.source_info.name_stack)) if p)

    @classmethod
    def _where(cls, eqn, prefix: str, site: str = "") -> str:
        """Module path and source line of an equation (inside a library's jit, the line that called it)."""
        path = cls._path(eqn, prefix) or "the top level"
        return f"{path} ({cls._site(eqn, site)})"

    @staticmethod
    def _site(eqn, site: str) -> str:
        line = source_info_util.summarize(eqn.source_info)
        return site if site and (not line or "site-packages" in line) else line or "unknown source line"

    @staticmethod
    def _fold(eqn, invals):
        """Evaluate an equation of known inputs with JAX itself."""
        outs = eqn.primitive.bind(*[jnp.asarray(x) for x in invals], **eqn.params)
        outs = outs if eqn.primitive.multiple_results else [outs]
        return [np.asarray(o) for o in outs]

    def _elementwise(self, eqn, invals):
        name = eqn.primitive.name
        if all(_is_const(x) for x in invals):
            common = np.broadcast_shapes(*[x.shape for x in invals])
            return self._fold(eqn, [np.broadcast_to(x, common) for x in invals])[0]
        if name == "integer_pow":
            return _integer_pow(invals[0], eqn.params["y"])
        if name in _UNARY:
            return _UNARY[name](invals[0])
        return _BINARY[name](*invals)

    @staticmethod
    def _broadcast_in_dim(eqn, x):
        shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
        unit = [1] * len(shape)
        for i, d in enumerate(dims):
            unit[d] = x.shape[i]
        return _reshape(x, unit)  # broadcast lazily; read() materialises where needed

    def _call(self, eqn, invals, prefix, site):
        params = eqn.params
        closed = next(params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in params)
        jaxpr, consts = (closed.jaxpr, closed.consts) if isinstance(closed, core.ClosedJaxpr) else (closed, ())
        if params.get("name") == "_im2col_conv" and len(eqn.invars[1].aval.shape) == 4:
            return [_same_conv(invals[0], invals[1], eqn.outvars[0].aval.shape)]
        if params.get("name") == "_resize":
            resized = self._resize(jaxpr, consts, invals[0], eqn.outvars[0].aval.shape)
            if resized is not None:
                return [resized]
        outer = [None if isinstance(v, core.Literal) else v for v in eqn.invars]
        return self.run(jaxpr, consts, invals, self._path(eqn, prefix), self._site(eqn, site), outer)

    @staticmethod
    def _resize(jaxpr, consts, x, out_shape):
        """``tf.image.resize`` (leading axes merged into the batch) for a ``jax.image.resize`` call
        that upsamples the two axes before the channels, if a probe input shows they agree; else None."""
        shape, out_shape = tuple(int(d) for d in x.shape), tuple(int(d) for d in out_shape)
        if (len(shape) < 4 or shape[:-3] != out_shape[:-3] or shape[-1] != out_shape[-1] or _is_const(x)
                or out_shape[-3] < shape[-3] or out_shape[-2] < shape[-2]):
            return None
        probe = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        expected = np.asarray(jax.jit(lambda x: core.eval_jaxpr(jaxpr, consts, x)[0])(probe))
        size = list(out_shape[-3:-1])
        batch = [int(np.prod(shape[:-3]))]
        with tf.init_scope():  # evaluate the candidates eagerly, outside the traced graph
            for method in ("bilinear", "nearest"):
                got = tf.image.resize(probe.reshape(batch + list(shape[-3:])), size, method=method).numpy()
                if np.allclose(got.reshape(out_shape), expected, atol=1e-5):
                    break
            else:
                return None
        resized = tf.image.resize(_reshape(x, batch + list(shape[-3:])), size, method=method)
        return _reshape(resized, out_shape)


def _same_conv(x, kernel, out_shape):
    """The Conv2D (SAME, stride 1) that ``fsl_jax.nets.layers._im2col_conv`` computes as matrix
    products; axes before H are merged into the batch (a ``vmap`` adds one)."""
    *lead, height, width, channels = (int(d) for d in x.shape)
    y = tf.nn.conv2d(_reshape(x, [int(np.prod(lead)), height, width, channels]), kernel, 1, "SAME")
    return _reshape(y, out_shape)


# --- rules for structural ops: (lowering, eqn, input values, where, **params) -> output(s) ---

def _convert_element_type(_, eqn, invals, where, new_dtype, **__):
    return tf.cast(invals[0], tf.as_dtype(new_dtype))


def _reshape_rule(_, eqn, invals, where, **__):
    return _reshape(invals[0], eqn.outvars[0].aval.shape)


def _transpose_rule(_, eqn, invals, where, permutation, **__):
    return _transpose(invals[0], permutation)


def _concatenate(_, eqn, invals, where, dimension, **__):
    return tf.concat(list(invals), axis=dimension)


def _split(_, eqn, invals, where, sizes, axis, **__):
    return tf.split(invals[0], list(sizes), axis=axis)


def _pad(_, eqn, invals, where, padding_config, **__):
    x, value = invals
    if any(interior for _, _, interior in padding_config):
        raise UnsupportedPrimitive("pad", where, "interior (dilating) padding")
    pads = [(lo, hi) for lo, hi, _ in padding_config]
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        x = _pad_or_crop(x, [(min(lo, 0), min(hi, 0)) for lo, hi in pads])
        pads = [(max(lo, 0), max(hi, 0)) for lo, hi in pads]
    return tf.pad(x, [list(p) for p in pads], constant_values=value) if any(a or b for a, b in pads) else x


def _slice(_, eqn, invals, where, start_indices, limit_indices, strides, **__):
    strides = strides or [1] * len(start_indices)
    return tf.strided_slice(invals[0], list(start_indices), list(limit_indices), list(strides))


def _dynamic_slice(_, eqn, invals, where, slice_sizes, **__):
    x, *starts = invals
    if all(_is_const(s) for s in starts):  # clamp as XLA does, then slice statically
        begin = [int(np.clip(s, 0, d - n)) for s, d, n in zip(starts, x.shape, slice_sizes)]
        return tf.slice(x, begin, list(slice_sizes))
    limits = tf.constant([int(d) - n for d, n in zip(x.shape, slice_sizes)], tf.int32)
    begin = tf.clip_by_value(tf.stack([tf.cast(s, tf.int32) for s in starts]), 0, limits)
    return tf.slice(x, begin, list(slice_sizes))


def _squeeze(_, eqn, invals, where, **__):
    return _reshape(invals[0], eqn.outvars[0].aval.shape)


def _rev(_, eqn, invals, where, dimensions, **__):
    return tf.reverse(invals[0], list(dimensions))


def _select_n(_, eqn, invals, where, **__):
    which, *cases = invals
    if which.dtype == tf.bool or (_is_const(which) and which.dtype == np.bool_):
        return tf.where(which, cases[1], cases[0])
    out = cases[0]
    for i, case in enumerate(cases[1:], 1):
        out = tf.where(tf.equal(which, i), case, out)
    return out


def _clamp(_, eqn, invals, where, **__):
    low, x, high = invals
    return tf.clip_by_value(x, low, high)


def _reduce(op):
    def rule(_, eqn, invals, where, axes, **__):
        return op(invals[0], axis=list(axes)) if axes else invals[0]
    return rule


def _reduce_max(lowering, eqn, invals, where, axes, **__):
    """reduce_max; the max over window axes of ``reshape(x, [..., h, k, w, k, C])`` (pooling written
    without ``reduce_window``, see ``fsl_jax.nets.layers.max_pool``) as the MaxPool it computes,
    any leading axes merged into the batch: Core ML tensors have rank 5 at most."""
    split = lowering.producers.get(eqn.invars[0])
    shape = tuple(int(d) for d in eqn.invars[0].aval.shape)
    rank = len(shape)
    if (split is not None and split.primitive.name == "reshape" and rank >= 6
            and tuple(a % rank for a in axes) == (rank - 4, rank - 2)):
        source = split.invars[0]
        *lead, h, kh, w, kw, c = shape
        if tuple(source.aval.shape) == (*lead, h * kh, w * kw, c) and not isinstance(source, core.Literal):
            crop = lowering.producers.get(source)  # x[..., :h*kh, :w*kw, :]: VALID pooling drops the rest itself
            if (crop is not None and crop.primitive.name == "slice" and not any(crop.params["start_indices"])
                    and crop.params["strides"] in (None, (1,) * len(lead) + (1, 1, 1))):
                source = crop.invars[0]
            x = _broadcast(lowering.values[source], source.aval.shape)
            x = _reshape(x, [int(np.prod(lead)), *x.shape[-3:]])
            return _reshape(tf.nn.max_pool2d(x, [kh, kw], [kh, kw], "VALID"), [*lead, h, w, c])
    return tf.reduce_max(invals[0], axis=list(axes)) if axes else invals[0]


def _arg(op):
    def rule(_, eqn, invals, where, axes, index_dtype, **__):
        return op(invals[0], axis=axes[0], output_type=tf.as_dtype(index_dtype))
    return rule


def _dot_general(lowering, eqn, invals, where, dimension_numbers, **__):
    """Any dot_general as (batched) MatMul between transposes and reshapes."""
    lhs, rhs = invals
    (lc, rc), (lb, rb) = dimension_numbers
    lf = [d for d in range(len(lhs.shape)) if d not in lc and d not in lb]
    rf = [d for d in range(len(rhs.shape)) if d not in rc and d not in rb]
    size = lambda x, dims: int(np.prod([x.shape[d] for d in dims], dtype=np.int64))
    b, m, k, n = size(lhs, lb), size(lhs, lf), size(lhs, lc), size(rhs, rf)
    lhs = _transpose(lhs, [*lb, *lf, *lc])
    rhs = _transpose(rhs, [*rb, *rc, *rf])
    batch = [b] if lb else []
    out = tf.matmul(_reshape(lhs, batch + [m, k]), _reshape(rhs, batch + [k, n]))
    return _reshape(out, eqn.outvars[0].aval.shape)


def _conv(_, eqn, invals, where, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
          feature_group_count, batch_group_count, **__):
    """2-D convolutions (plain, strided, dilated, grouped, depthwise, transposed) in NHWC/HWIO."""
    lhs, rhs = invals
    if len(lhs.shape) != 4:
        raise UnsupportedPrimitive("conv_general_dilated", where, f"{len(lhs.shape) - 2}-D convolution; only 2-D is lowered")
    if batch_group_count != 1:
        raise UnsupportedPrimitive("conv_general_dilated", where, "batch_group_count > 1")
    ls, rs, os_ = dimension_numbers.lhs_spec, dimension_numbers.rhs_spec, dimension_numbers.out_spec
    x = _transpose(lhs, [ls[0], ls[2], ls[3], ls[1]])  # NHWC
    w = _transpose(rhs, [rs[2], rs[3], rs[1], rs[0]])  # HWIO
    kh, kw, cin, cout = (int(d) for d in w.shape)
    transposed = any(d != 1 for d in lhs_dilation)
    if transposed:
        if any(s != 1 for s in window_strides) or any(d != 1 for d in rhs_dilation) or feature_group_count != 1:
            raise UnsupportedPrimitive("conv_general_dilated", where,
                                       "input dilation combined with strides, kernel dilation or groups")
        y = _conv_transpose(x, w, lhs_dilation, padding)
    else:
        sizes = [int(x.shape[1]), int(x.shape[2])]
        same = [_same_padding(n, k, s, d) for n, k, s, d in zip(sizes, (kh, kw), window_strides, rhs_dilation)]
        pads = [tuple(p) for p in padding]
        if pads == same:
            mode = "SAME"
        else:
            mode = "VALID"
            if any(lo or hi for lo, hi in pads):
                x = _pad_or_crop(x, [(0, 0), *pads, (0, 0)])
        strides, dilations = [1, *window_strides, 1], [1, *rhs_dilation, 1]
        groups = feature_group_count
        if groups == 1:
            y = tf.nn.conv2d(x, w, strides, mode, dilations=dilations)
        elif cin == 1 and groups == int(x.shape[3]):  # depthwise: output channel g * mult + m
            y = tf.nn.depthwise_conv2d(x, _reshape(w, [kh, kw, groups, cout // groups]), strides, mode,
                                       dilations=list(rhs_dilation))
        else:
            xs = tf.split(x, groups, axis=3)
            ws = np.split(w, groups, axis=3) if _is_const(w) else tf.split(w, groups, axis=3)
            y = tf.concat([tf.nn.conv2d(a, b, strides, mode, dilations=dilations) for a, b in zip(xs, ws)], 3)
    nhwc = {0: 0, 1: 3, 2: 1, 3: 2}  # logical (N, C, H, W) -> position in NHWC
    perm = [nhwc[[j for j in range(4) if os_[j] == p][0]] for p in range(4)]
    return _transpose(y, perm)


def _conv_transpose(x, w, dilation, padding):
    """A convolution of the input dilated by ``dilation`` (how ``lax.conv_transpose`` works) as
    ``Conv2DBackpropInput``: the full ('VALID') transposed convolution of the flipped kernel,
    then cropped or zero-padded to the requested padding."""
    kh, kw = int(w.shape[0]), int(w.shape[1])
    flipped = _transpose(w[::-1, ::-1] if _is_const(w) else tf.reverse(w, [0, 1]), [0, 1, 3, 2])  # HW(out)(in)
    n, h, wd = int(x.shape[0]), int(x.shape[1]), int(x.shape[2])
    full = [(h - 1) * dilation[0] + kh, (wd - 1) * dilation[1] + kw]
    y = tf.nn.conv2d_transpose(x, flipped, [n, *full, int(w.shape[3])], [1, *dilation, 1], "VALID")
    pads = [(lo - (k - 1), hi - (k - 1)) for (lo, hi), k in zip(padding, (kh, kw))]
    return _pad_or_crop(y, [(0, 0), *pads, (0, 0)])


def _reduce_window(kind):
    def rule(_, eqn, invals, where, window_dimensions, window_strides, padding, base_dilation, window_dilation, **__):
        x = invals[0]
        name = eqn.primitive.name
        pads = [tuple(p) for p in padding]
        if (len(x.shape) != 4 or window_dimensions[0] != 1 or window_dimensions[3] != 1 or window_strides[0] != 1
                or window_strides[3] != 1 or pads[0] != (0, 0) or pads[3] != (0, 0)):
            raise UnsupportedPrimitive(name, where, "only windows over the two spatial axes of NHWC are lowered")
        if any(d != 1 for d in (*base_dilation, *window_dilation)):
            raise UnsupportedPrimitive(name, where, "dilated windows")
        window, strides = list(window_dimensions[1:3]), list(window_strides[1:3])
        if kind == "max":
            same = [_same_padding(int(n), k, s) for n, k, s in zip(x.shape[1:3], window, strides)]
            if pads[1:3] == same and any(lo or hi for lo, hi in same):
                return tf.nn.max_pool2d(x, window, strides, "SAME")  # TF ignores the padding, as -inf does
            if any(lo or hi for lo, hi in pads):
                x = tf.pad(x, [list(p) for p in pads], constant_values=-np.inf)
            return tf.nn.max_pool2d(x, window, strides, "VALID")
        if any(lo or hi for lo, hi in pads):
            x = tf.pad(x, [list(p) for p in pads])
        return tf.nn.avg_pool2d(x, window, strides, "VALID") * float(window[0] * window[1])
    return rule


def _gather(_, eqn, invals, where, dimension_numbers, slice_sizes, **__):
    """The gather of ``jnp.take`` along one axis with known indices (e.g. nearest-neighbour resize)."""
    x, indices = invals
    dn = dimension_numbers
    axis = dn.start_index_map[0] if len(dn.start_index_map) == 1 else None
    ok = (axis is not None and _is_const(indices) and tuple(dn.collapsed_slice_dims) == (axis,)
          and not dn.operand_batching_dims and indices.ndim == 2 and indices.shape[1] == 1
          and all(s == d for i, (s, d) in enumerate(zip(slice_sizes, x.shape)) if i != axis))
    if not ok:
        raise UnsupportedPrimitive("gather", where, "only a take along one axis with constant indices is lowered")
    idx = np.clip(indices[:, 0], 0, int(x.shape[axis]) - 1).astype(np.int32)
    out = tf.gather(x, idx, axis=axis)  # gathered axis stays at `axis`
    offset = list(dn.offset_dims)
    rank = len(x.shape)
    order = [d for d in range(rank) if d != axis]  # operand dims as they appear in offset_dims
    perm = [0] * rank
    batch_pos = [p for p in range(rank) if p not in offset][0]
    perm[batch_pos] = axis
    for pos, d in zip(offset, order):
        perm[pos] = d
    return _transpose(out, perm)


_RULES: dict[str, Callable] = {
    "convert_element_type": _convert_element_type, "reshape": _reshape_rule, "transpose": _transpose_rule,
    "concatenate": _concatenate, "split": _split, "pad": _pad, "slice": _slice, "dynamic_slice": _dynamic_slice,
    "squeeze": _squeeze, "rev": _rev, "select_n": _select_n, "clamp": _clamp,
    "reduce_sum": _reduce(tf.reduce_sum), "reduce_max": _reduce_max, "reduce_min": _reduce(tf.reduce_min),
    "reduce_prod": _reduce(tf.reduce_prod), "reduce_and": _reduce(tf.reduce_all), "reduce_or": _reduce(tf.reduce_any),
    "argmax": _arg(tf.argmax), "argmin": _arg(tf.argmin),
    "dot_general": _dot_general, "conv_general_dilated": _conv,
    "reduce_window_max": _reduce_window("max"), "reduce_window_sum": _reduce_window("sum"),
    "gather": _gather,
    **{name: (lambda _, eqn, invals, where, **__: invals[0] if len(invals) == 1 else list(invals)) for name in _IDENTITY},
}
SUPPORTED = frozenset(_RULES) | frozenset(_BINARY) | frozenset(_UNARY) | _CALLS | {
    "integer_pow", "broadcast_in_dim", "iota"}


def lower(fn: Callable, inputs: Sequence[tuple[str, tuple[int, ...]]], output_names: Sequence[str]):
    """Lower ``fn(*arrays) -> array or tuple of arrays`` (parameters closed over) to a concrete
    ``tf.function`` of standard ops with float32 inputs named and shaped as ``inputs`` and
    outputs named ``output_names``. Returns ``(concrete_function, primitive_counts)``."""
    specs = [jax.ShapeDtypeStruct(shape, jnp.float32) for _, shape in inputs]
    closed = jax.make_jaxpr(fn)(*specs)
    if len(closed.jaxpr.outvars) != len(output_names):
        raise ExportError(f"the model returns {len(closed.jaxpr.outvars)} outputs but {len(output_names)} names "
                          f"were given: {list(output_names)}")
    lowering = _Lowering()

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name=name) for name, shape in inputs],
                 autograph=False)
    def graph(*args):
        outs = lowering.run(closed.jaxpr, closed.consts, args)
        return tuple(tf.identity(tf.convert_to_tensor(o), name=n) for o, n in zip(outs, output_names))

    return graph.get_concrete_function(), lowering.counts
