"""Read a saved ``.mlpackage`` on any OS: audit its ML Program and evaluate it with numpy.

Core ML's runtime is macOS-only, so on Linux the exported file is checked by reading it:
the MIL program from ``Data/com.apple.CoreML/model.mlmodel`` (protobuf) and the weights
from the blob file next to it (through coremltools' blob-storage reader), then running the
program with numpy implementations of the MIL operations the exported models use. Each
operation's result is stored in the dtype the program declares (float16 programs round at
every step, as the device would).
"""
from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np

from fsl_jax.errors import ExportError

_DTYPES = {"FLOAT16": np.float16, "FLOAT32": np.float32, "FLOAT64": np.float64, "INT8": np.int8, "INT16": np.int16,
           "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8, "BOOL": np.bool_}
_BLOB_READERS = {np.float16: "read_fp16_data", np.float32: "read_float_data", np.int8: "read_int8_data",
                 np.uint8: "read_uint8_data", np.int16: "read_int16_data", np.int32: "read_int32_data"}


def _spec(path: Path):
    import coremltools as ct

    if not (Path(path) / "Data" / "com.apple.CoreML" / "model.mlmodel").is_file():
        raise ExportError(f"{path} is not an .mlpackage (no Data/com.apple.CoreML/model.mlmodel)")
    spec = ct.utils.load_spec(str(path))
    if spec.WhichOneof("Type") != "mlProgram":
        raise ExportError(f"{path} is not an ML Program (model type {spec.WhichOneof('Type')!r})")
    return spec


def _main_block(spec):
    function = spec.mlProgram.functions["main"]
    return function, function.block_specializations[function.opset]


def _tensor_type(value_type):
    """(numpy dtype, shape or None) of a MIL ValueType."""
    from coremltools.proto import MIL_pb2

    tensor = value_type.tensorType
    dtype = _DTYPES.get(MIL_pb2.DataType.Name(tensor.dataType))
    shape = tuple(d.constant.size for d in tensor.dimensions) if tensor.dimensions else ()
    return dtype, shape


@dataclasses.dataclass
class Audit:
    """What a saved ML Program contains."""

    ops: dict[str, int]  # MIL operation type -> count (constants included)
    inputs: dict[str, tuple[str, tuple[int, ...]]]  # name -> (type, shape)
    outputs: dict[str, tuple[str, tuple[int, ...]]]
    opset: str
    unknown: list[str]  # operation types that are not MIL operations
    metadata: dict[str, str]

    @property
    def op_count(self) -> int:
        """Operations that compute (constants excluded)."""
        return sum(n for op, n in self.ops.items() if op != "const")


def _feature(feature) -> tuple[str, tuple[int, ...]]:
    kind = feature.type.WhichOneof("Type")
    if kind == "imageType":
        image = feature.type.imageType
        from coremltools.proto import FeatureTypes_pb2

        space = FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(image.colorSpace)
        return f"image({space})", (int(image.height), int(image.width))
    array = feature.type.multiArrayType
    from coremltools.proto import FeatureTypes_pb2

    return (f"array({FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType)})",
            tuple(int(s) for s in array.shape))


def audit(path: str | Path) -> Audit:
    """List the MIL operations, inputs and outputs of a saved ``.mlpackage``."""
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    spec = _spec(Path(path))
    function, block = _main_block(spec)
    ops = collections.Counter(op.type for op in block.operations)
    known = set(SSAOpRegistry.core_ops)
    return Audit(dict(ops), {f.name: _feature(f) for f in spec.description.input},
                 {f.name: _feature(f) for f in spec.description.output}, function.opset,
                 sorted(op for op in ops if op not in known), dict(spec.description.metadata.userDefined))


class Program:
    """The ML Program of a saved ``.mlpackage``, runnable with numpy: ``Program(path)(image=x)``.

    Array inputs have the model's shape; image inputs are 8-bit pixel values [1, H, W, C].
    """

    def __init__(self, path: str | Path):
        from coremltools import libmilstoragepython

        self.path = Path(path)
        spec = _spec(self.path)
        function, self.block = _main_block(spec)
        self.input_types = {i.name: _tensor_type(i.type) for i in function.inputs}
        self.output_names = list(self.block.outputs)
        self.spec = spec
        weights = self.path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
        self._blobs = libmilstoragepython._BlobStorageReader(str(weights)) if weights.is_file() else None

    def _value(self, value):
        """A MIL Value (immediate or in the weight file) as a numpy array."""
        dtype, shape = _tensor_type(value.type)
        if value.WhichOneof("value") == "blobFileValue":
            data = np.asarray(getattr(self._blobs, _BLOB_READERS[dtype])(value.blobFileValue.offset))
            # float16 blobs come back as their raw 16-bit patterns
            return (data.astype(np.uint16).view(np.float16) if dtype == np.float16 else data.astype(dtype)).reshape(shape)
        tensor = value.immediateValue.tensor
        kind = tensor.WhichOneof("value")
        if kind == "strings":
            values = list(tensor.strings.values)
            return values[0] if not shape else np.array(values)
        if kind == "bytes":
            data = np.frombuffer(tensor.bytes.values, dtype)
        else:
            data = np.asarray(list(getattr(tensor, kind).values), dtype)
        return data.reshape(shape)

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        env = {}
        images = {f.name for f in self.spec.description.input if f.type.WhichOneof("Type") == "imageType"}
        for name, (dtype, shape) in self.input_types.items():
            if name not in inputs:
                raise ExportError(f"input {name!r} is missing; the program takes {list(self.input_types)}")
            x = np.asarray(inputs[name], dtype)
            if name in images and x.ndim == 4:  # pixels [1, H, W, C] -> the program's [1, C, H, W]
                x = x.transpose(0, 3, 1, 2)
            if x.shape != shape:
                raise ExportError(f"input {name!r} has shape {x.shape}, the program takes {shape}")
            env[name] = x
        for op in self.block.operations:
            args = {k: self._argument(v, env) for k, v in op.inputs.items()}
            attrs = {k: self._value(v) for k, v in op.attributes.items() if k != "name"}
            rule = _OPS.get(op.type)
            if rule is None:
                raise ExportError(f"the numpy evaluator has no rule for MIL operation {op.type!r}")
            results = rule(**args, **attrs)
            results = results if isinstance(results, tuple) else (results,)
            for out, value in zip(op.outputs, results):
                dtype, _ = _tensor_type(out.type)
                env[out.name] = np.asarray(value).astype(dtype) if dtype is not None else value
        return {name: env[name] for name in self.output_names}

    def _argument(self, argument, env):
        values = [env[b.name] if b.WhichOneof("binding") == "name" else self._value(b.value)
                  for b in argument.arguments]
        return values[0] if len(values) == 1 else values


# --- numpy rules: MIL operation semantics (coremltools.converters.mil.mil.ops.defs) ---

def _f(x):
    """Compute in at least float32 (results are cast back to the declared dtype)."""
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == np.float16 else x


def _spatial_pads(pad_type, pad, x_shape, kernel, strides, dilations):
    """(top, bottom, left, right) padding of a conv or pool window."""
    if pad_type == "custom":
        return [int(p) for p in pad]
    if pad_type == "valid":
        return [0, 0, 0, 0]
    pads = []
    for size, k, s, d in zip(x_shape[2:], kernel, strides, dilations):
        effective = (k - 1) * d + 1
        total = max((-(-size // s) - 1) * s + effective - size, 0)
        low = total // 2 if pad_type == "same" else total - total // 2
        pads += [low, total - low]
    return pads


def _windows(x, kernel, strides, dilations):
    """View of x [N, C, H, W] as [N, C, outH, outW, kh, kw]."""
    n, c, h, w = x.shape
    kh, kw = kernel
    oh = (h - (kh - 1) * dilations[0] - 1) // strides[0] + 1
    ow = (w - (kw - 1) * dilations[1] - 1) // strides[1] + 1
    sn, sc, sh, sw = x.strides
    return np.lib.stride_tricks.as_strided(
        x, (n, c, oh, ow, kh, kw), (sn, sc, sh * strides[0], sw * strides[1], sh * dilations[0], sw * dilations[1]),
        writeable=False)


def _conv(x, weight, strides=(1, 1), pad_type="valid", pad=(0, 0, 0, 0), dilations=(1, 1), groups=1, bias=None):
    x, weight = _f(x), _f(weight)
    kernel = weight.shape[2:]
    top, bottom, left, right = _spatial_pads(pad_type, pad, x.shape, kernel, strides, dilations)
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    groups = int(groups)
    cin, cout = x.shape[1] // groups, weight.shape[0] // groups
    outs = []
    for g in range(groups):
        win = _windows(np.ascontiguousarray(x[:, g * cin:(g + 1) * cin]), kernel, strides, dilations)
        n, _, oh, ow = win.shape[:4]
        columns = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, -1)  # im2col, then one BLAS product
        w = weight[g * cout:(g + 1) * cout].reshape(cout, -1)
        outs.append((columns @ w.T).reshape(n, oh, ow, cout).transpose(0, 3, 1, 2))
    y = np.concatenate(outs, 1)
    return y if bias is None else y + _f(bias)[None, :, None, None]


def _conv_transpose(x, weight, strides=(1, 1), pad_type="valid", pad=(0, 0, 0, 0), dilations=(1, 1), groups=1,
                    bias=None, output_shape=None):
    """Scatter form: every input pixel adds its kernel-weighted contribution, then the padding is cropped."""
    x, weight = _f(x), _f(weight)
    if int(groups) != 1:
        raise ExportError("the numpy evaluator supports conv_transpose with groups=1 only")
    n, _, h, w = x.shape
    kh, kw = weight.shape[2:]
    sh, sw = strides
    dh, dw = dilations
    full = np.zeros((n, weight.shape[1], (h - 1) * sh + (kh - 1) * dh + 1, (w - 1) * sw + (kw - 1) * dw + 1), np.float32)
    for i in range(kh):
        for j in range(kw):
            full[:, :, i * dh: i * dh + (h - 1) * sh + 1: sh, j * dw: j * dw + (w - 1) * sw + 1: sw] += \
                np.einsum("nchw,co->nohw", x, weight[:, :, i, j])
    if output_shape is not None and pad_type != "custom":
        out_h, out_w = [int(s) for s in np.asarray(output_shape)[-2:]]
        total_h, total_w = full.shape[2] - out_h, full.shape[3] - out_w
        top = total_h // 2 if pad_type == "same" else 0
        left = total_w // 2 if pad_type == "same" else 0
        pads = (top, total_h - top, left, total_w - left)
    else:
        pads = [int(p) for p in pad] if pad_type == "custom" else (0, 0, 0, 0)
    top, bottom, left, right = pads
    y = full[:, :, top: full.shape[2] - bottom, left: full.shape[3] - right]
    return y if bias is None else y + _f(bias)[None, :, None, None]


def _pool(reduce, fill):
    def rule(x, kernel_sizes, strides, pad_type, pad=(0, 0, 0, 0), ceil_mode=False, exclude_padding_from_average=False):
        x = _f(x)
        top, bottom, left, right = _spatial_pads(pad_type, pad, x.shape, kernel_sizes, strides, (1, 1))
        if ceil_mode:
            raise ExportError("the numpy evaluator does not support ceil_mode pooling")
        padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=fill)
        win = _windows(padded, kernel_sizes, strides, (1, 1))
        if reduce == "max":
            return win.max((-2, -1))
        if exclude_padding_from_average and (top or bottom or left or right):
            ones = np.pad(np.ones_like(x), ((0, 0), (0, 0), (top, bottom), (left, right)))
            return win.sum((-2, -1)) / _windows(ones, kernel_sizes, strides, (1, 1)).sum((-2, -1))
        return win.mean((-2, -1))
    return rule


def _resize_axis(x, axis, out, mode, align_corners=False):
    """Linear or nearest resampling of one axis with half-pixel centres (TensorFlow 2's convention)."""
    size = x.shape[axis]
    if mode == "nearest":
        index = np.minimum(np.floor((np.arange(out) + 0.5) * size / out), size - 1).astype(int)
        return np.take(x, index, axis)
    if align_corners and out > 1:
        pos = np.arange(out) * (size - 1) / (out - 1)
    else:
        pos = np.clip((np.arange(out) + 0.5) * size / out - 0.5, 0, size - 1)
    low = np.floor(pos).astype(int)
    high = np.minimum(low + 1, size - 1)
    frac = (pos - low).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = out
    return np.take(x, low, axis) * (1 - frac.reshape(shape)) + np.take(x, high, axis) * frac.reshape(shape)


def _resize(mode):
    def rule(x, target_size_height=None, target_size_width=None, scale_factor_height=None, scale_factor_width=None,
             sampling_mode="DEFAULT", align_corners=False, half_pixel_centers=None, **_):
        x = _f(x)
        h = int(target_size_height) if target_size_height is not None else int(round(x.shape[-2] * float(scale_factor_height)))
        w = int(target_size_width) if target_size_width is not None else int(round(x.shape[-1] * float(scale_factor_width)))
        if mode == "linear" and sampling_mode not in ("UNALIGN_CORNERS", "DEFAULT") and not align_corners:
            raise ExportError(f"the numpy evaluator does not support resize sampling_mode {sampling_mode!r}")
        corners = align_corners or sampling_mode == "ALIGN_CORNERS"
        return _resize_axis(_resize_axis(x, x.ndim - 2, h, mode, corners), x.ndim - 1, w, mode, corners)
    return rule


def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None, **_):
    index = []
    for axis in range(x.ndim):
        b, e = int(begin[axis]), int(end[axis])
        s = int(stride[axis]) if stride is not None else 1
        b = None if begin_mask is not None and begin_mask[axis] else b
        e = None if end_mask is not None and end_mask[axis] else e
        index.append(b if squeeze_mask is not None and squeeze_mask[axis] else slice(b, e, s))
    return x[tuple(index)]


def _reduce(fn):
    def rule(x, axes=None, keep_dims=False):
        return fn(_f(x), axis=None if axes is None else tuple(int(a) for a in np.atleast_1d(axes)), keepdims=bool(keep_dims))
    return rule


def _softmax(x, axis=-1):
    x = _f(x)
    e = np.exp(x - x.max(int(axis), keepdims=True))
    return e / e.sum(int(axis), keepdims=True)


def _matmul(x, y, transpose_x=False, transpose_y=False):
    x, y = _f(x), _f(y)
    x = np.swapaxes(x, -1, -2) if transpose_x and x.ndim > 1 else x
    y = np.swapaxes(y, -1, -2) if transpose_y and y.ndim > 1 else y
    return x @ y


def _pad(x, pad, mode="constant", constant_val=0.0):
    pad = np.asarray(pad, int).reshape(-1, 2)
    widths = [(0, 0)] * (x.ndim - len(pad)) + [tuple(p) for p in pad]
    if mode != "constant":
        raise ExportError(f"the numpy evaluator supports constant padding only, not {mode!r}")
    return np.pad(_f(x), widths, constant_values=float(constant_val))


def _cast(x, dtype):
    names = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int16": np.int16, "int8": np.int8,
             "uint8": np.uint8, "bool": np.bool_}
    return np.asarray(x).astype(names[str(dtype)])


_OPS = {
    "const": lambda val: val,
    "identity": lambda x: x,
    "add": lambda x, y: _f(x) + _f(y), "sub": lambda x, y: _f(x) - _f(y), "mul": lambda x, y: _f(x) * _f(y),
    "real_div": lambda x, y: _f(x) / _f(y), "floor_div": lambda x, y: np.floor_divide(x, y),
    "maximum": lambda x, y: np.maximum(_f(x), _f(y)), "minimum": lambda x, y: np.minimum(_f(x), _f(y)),
    "pow": lambda x, y: np.power(_f(x), _f(y)),
    "greater": lambda x, y: _f(x) > _f(y), "greater_equal": lambda x, y: _f(x) >= _f(y),
    "less": lambda x, y: _f(x) < _f(y), "less_equal": lambda x, y: _f(x) <= _f(y),
    "equal": lambda x, y: _f(x) == _f(y), "not_equal": lambda x, y: _f(x) != _f(y),
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_not": np.logical_not,
    "select": lambda cond, a, b: np.where(cond, _f(a), _f(b)),
    "relu": lambda x: np.maximum(_f(x), 0), "sigmoid": lambda x: 1 / (1 + np.exp(-_f(x))),
    "leaky_relu": lambda x, alpha=0.01: np.where(_f(x) >= 0, _f(x), float(alpha) * _f(x)),
    "tanh": lambda x: np.tanh(_f(x)), "exp": lambda x: np.exp(_f(x)), "log": lambda x, epsilon=0.0: np.log(_f(x) + float(epsilon)),
    "sqrt": lambda x: np.sqrt(_f(x)), "rsqrt": lambda x, epsilon=0.0: 1 / np.sqrt(_f(x) + float(epsilon)),
    "square": lambda x: np.square(_f(x)), "abs": lambda x: np.abs(_f(x)), "neg": lambda x: -_f(x),
    "inverse": lambda x, epsilon=0.0: 1 / (_f(x) + float(epsilon)), "floor": lambda x: np.floor(_f(x)),
    "clip": lambda x, alpha, beta: np.clip(_f(x), float(alpha), float(beta)),
    "erf": lambda x: np.vectorize(__import__("math").erf)(_f(x)).astype(np.float32),
    "cast": _cast,
    "conv": _conv, "conv_transpose": _conv_transpose,
    "max_pool": _pool("max", -np.inf), "avg_pool": _pool("avg", 0.0),
    "matmul": _matmul, "linear": lambda x, weight, bias=None: _f(x) @ _f(weight).T + (0 if bias is None else _f(bias)),
    "reshape": lambda x, shape: np.reshape(x, [int(s) for s in shape]),
    "transpose": lambda x, perm: np.transpose(x, [int(p) for p in perm]),
    "squeeze": lambda x, axes=None: np.squeeze(x, None if axes is None else tuple(int(a) for a in axes)),
    "expand_dims": lambda x, axes: np.expand_dims(x, tuple(int(a) for a in axes)),
    "concat": lambda values, axis, interleave=False: np.concatenate([_f(v) for v in values], int(axis)),
    "split": lambda x, axis, num_splits=None, split_sizes=None: tuple(np.split(
        x, np.cumsum(split_sizes)[:-1] if split_sizes is not None else int(num_splits), int(axis))),
    "slice_by_index": _slice_by_index,
    "slice_by_size": lambda x, begin, size: x[tuple(slice(int(b), None if int(s) == -1 else int(b) + int(s))
                                                     for b, s in zip(begin, size))],
    "tile": lambda x, reps: np.tile(x, [int(r) for r in reps]),
    "pad": _pad,
    "reduce_sum": _reduce(np.sum), "reduce_mean": _reduce(np.mean), "reduce_max": _reduce(np.max),
    "reduce_min": _reduce(np.min), "reduce_prod": _reduce(np.prod),
    "reduce_argmax": lambda x, axis=-1, keep_dims=False, output_dtype="int32":
        np.expand_dims(np.argmax(x, int(axis)), int(axis)) if keep_dims else np.argmax(x, int(axis)),
    "softmax": _softmax,
    "gather": lambda x, indices, axis=0, batch_dims=0, validate_indices=False: np.take(x, np.asarray(indices, int), int(axis)),
    "resize_bilinear": _resize("linear"), "upsample_bilinear": _resize("linear"),
    "resize_nearest_neighbor": _resize("nearest"), "upsample_nearest_neighbor": _resize("nearest"),
}
