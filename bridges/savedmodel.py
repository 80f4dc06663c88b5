"""TensorFlow SavedModel through jax2tf: the TensorFlow users' path and the numeric reference.

The parameters become ``tf.Variable``s of the SavedModel (jax2tf's recommended way to keep
weights out of the serialised graph); the computation is jax2tf's ``XlaCallModule`` with a
polymorphic batch dimension, served under the ``serving_default`` signature with the
model's input and output names.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf
from jax.experimental import jax2tf

from bridges.models import Exportable


def to_savedmodel(model: Exportable, path: str | Path) -> Path:
    """Write ``model`` as a SavedModel directory at ``path``; returns the path."""
    params = tf.nest.map_structure(lambda x: tf.Variable(np.asarray(x), trainable=False), model.params)
    converted = jax2tf.convert(model.apply, with_gradient=False,
                               polymorphic_shapes=[None] + [f"(b, {', '.join(map(str, i.shape))})" for i in model.inputs])
    module = tf.Module()
    module.params = params

    @tf.function(autograph=False, input_signature=[tf.TensorSpec((None, *i.shape), tf.float32, name=i.name)
                                                   for i in model.inputs])
    def serve(*inputs):
        return dict(zip(model.outputs, converted(params, *inputs)))

    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})
    return Path(path)


def run_savedmodel(path: str | Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a SavedModel written by :func:`to_savedmodel` on named numpy inputs."""
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    return {k: v.numpy() for k, v in serve(**{k: tf.constant(v, tf.float32) for k, v in inputs.items()}).items()}
