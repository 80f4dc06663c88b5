"""Core ML ML Program (``.mlpackage``) from the lowered TensorFlow graph.

coremltools' TensorFlow front end converts the ``tf.function`` of standard ops that
:mod:`bridges.lower` builds (it cannot read jax2tf's ``XlaCallModule``). Options: float32 or
float16 compute precision, the minimum deployment target, image-typed inputs with the
model's pixel normalisation folded into Core ML's ``scale`` and ``bias``, and metadata.
Inputs have batch size 1, as an app feeds one image at a time.
"""
from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' per-pass progress bars

import numpy as np

from bridges.lower import lower
from bridges.models import Exportable
from fsl_jax.errors import ExportError

PRECISIONS = ("fp32", "fp16")
DEFAULT_TARGET = "iOS16"


def deployment_target(name: str):
    """coremltools' target of that name; an ML Program needs iOS15 / macOS12 or later."""
    import coremltools as ct

    known = [n for n, t in ct.target.__members__.items() if t.value >= ct.target.iOS15.value]
    if name not in known:
        raise ExportError(f"unknown minimum deployment target {name!r} for an ML Program; known: {known}")
    return ct.target.__members__[name]


def to_coreml(model: Exportable, path: str | Path | None = None, precision: str = "fp32",
              minimum_deployment_target: str = DEFAULT_TARGET, image_input: bool = False):
    """Convert ``model`` to an ML Program; saved as ``.mlpackage`` at ``path`` if given.

    Returns ``(mlmodel, graph)``: graph is the lowered ``tf.function`` that was converted.
    image_input: inputs are Core ML images (8-bit pixels, the model's normalisation folded into
    Core ML's scale and bias); otherwise float32 arrays normalised as in training.
    """
    import coremltools as ct

    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    concrete, _ = lower(model.one, [(i.name, (1, *i.shape)) for i in model.inputs], model.outputs)
    inputs = []
    for i in model.inputs:
        if image_input:
            layout = {1: ct.colorlayout.GRAYSCALE, 3: ct.colorlayout.RGB}.get(i.shape[-1])
            if layout is None:
                raise ExportError(f"input {i.name!r} has {i.shape[-1]} channels; an image input needs 1 or 3")
            inputs.append(ct.ImageType(name=i.name, shape=(1, *i.shape), scale=i.scale, bias=list(i.bias),
                                       color_layout=layout, channel_first=False))
        else:
            inputs.append(ct.TensorType(name=i.name, shape=(1, *i.shape), dtype=np.float32))
    # coremltools' fuse_elementwise_to_batchnorm rewrites mul+add as a batch_norm with variance 1
    # and its default epsilon 1e-5, scaling the result by 1/sqrt(1 + 1e-5): a 5e-6 relative error.
    # Without it, the same mul+add still fold exactly into the preceding conv (fuse_conv_scale/bias).
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes(["common::fuse_elementwise_to_batchnorm"])
    mlmodel = ct.convert(
        [concrete], source="tensorflow", convert_to="mlprogram", inputs=inputs,
        outputs=[ct.TensorType(name=t.name.split(":")[0], dtype=np.float32) for t in concrete.outputs],
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        minimum_deployment_target=deployment_target(minimum_deployment_target), pass_pipeline=pipeline)
    # TensorFlow names a function's outputs Identity, Identity_1, ...: give them the model's names.
    spec = mlmodel.get_spec()
    for tensor, name in zip(concrete.outputs, model.outputs):
        ct.utils.rename_feature(spec, tensor.name.split(":")[0], name)
    mlmodel = ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir)
    _describe(mlmodel, model, precision, image_input)
    if path is not None:
        mlmodel.save(str(path))
    return mlmodel, concrete


def _describe(mlmodel, model: Exportable, precision: str, image_input: bool) -> None:
    mlmodel.short_description = model.description
    mlmodel.author = "fsl_jax"
    mlmodel.license = model.metadata.get("licence", "")
    mlmodel.version = version("fsl_jax")
    for key, value in {**model.metadata, "kind": model.kind, "precision": precision}.items():
        mlmodel.user_defined_metadata[key] = str(value)
    for i in model.inputs:
        what = (f"{i.shape[1]}x{i.shape[0]} image; pixels p become {i.scale:.6g} * p + {list(i.bias)}"
                if image_input else f"float32 array (1, {', '.join(map(str, i.shape))}), normalised as in training")
        mlmodel.input_description[i.name] = what
    descriptions = {"class_probabilities": "probability of each class, in the order of the class_labels metadata",
                    "embedding": "feature vector of the image",
                    "mask_probability": "per-pixel probability of the target class"}
    for name in model.outputs:
        mlmodel.output_description[name] = descriptions.get(name, name)
