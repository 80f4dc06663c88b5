"""What gets exported: a trained run turned into pure inference functions with their parameters.

An :class:`Exportable` is ``apply(params, *inputs) -> outputs`` plus the parameter pytree it
runs with (trained weights, the BatchNorm statistics of a reference batch, prototypes of a
support set, adapted weights), its named inputs and outputs, metadata, and real example
inputs used for the parity checks. The SavedModel and Core ML writers take nothing else.

Exported models use fixed BatchNorm statistics, those of the support set (see
:class:`fsl_jax.nets.BatchNorm`): a deployed model sees one image at a time, so it cannot
normalise with its own batch as episodic training does.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from fsl_jax.errors import DataError, ExportError
from fsl_jax.methods import make_backbone

LICENCE = "Apache-2.0 (fsl_jax); trained on Omniglot (MIT licence, Lake et al. 2015)"


@dataclasses.dataclass(frozen=True)
class Input:
    """A named input of shape ``(batch, *shape)``. ``scale`` and ``bias`` map 8-bit pixels ``p``
    to the model's input ``scale * p + bias`` (per channel), so Core ML can take an image."""

    name: str
    shape: tuple[int, ...]  # without the batch axis: (H, W, C)
    scale: float = 1 / 255
    bias: tuple[float, ...] = (0.0,)


@dataclasses.dataclass
class Exportable:
    kind: str  # "embedding", "classifier", "prototype-segmenter", "siamese-unet", "maml-segmenter"
    apply: Callable[..., tuple]
    params: Any
    inputs: list[Input]
    outputs: list[str]
    description: str
    metadata: dict[str, str]
    examples: tuple[np.ndarray, ...]  # real inputs with a leading batch axis, one per input
    class_labels: list[str] | None = None
    # The same function for a batch of one, if simpler to lower than ``apply`` (Core ML's fixed batch)
    apply_one: Callable[..., tuple] | None = None

    def __call__(self, *inputs):
        """The JAX reference (jitted): what every exported form must compute."""
        return jax.jit(self.apply)(self.params, *inputs)

    def one(self, *inputs):
        """The model on a batch of one: what the Core ML graph is lowered from."""
        if self.apply_one is None:
            return self(*inputs)
        return jax.jit(self.apply_one)(self.params, *inputs)


@dataclasses.dataclass(frozen=True)
class Support:
    """Labelled support images of a classifier: images [S, H, W, C], labels [S] in [0, N)."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    queries: np.ndarray  # real query images of the same classes (parity checks); may be empty
    source: str
    statistics: np.ndarray | None = None  # images whose BatchNorm statistics are fixed; None: the support's

    @property
    def norm_images(self) -> np.ndarray:
        return self.images if self.statistics is None else self.statistics


def run_metadata(config: dict, run: Path, step: int) -> dict[str, str]:
    return {"method": config["method"], "backbone": config["backbone"], "run": str(run), "checkpoint_step": str(step),
            "training_config": yaml.safe_dump(config, sort_keys=False), "licence": LICENCE}


def _backbone_params(config: dict, params):
    """The backbone's parameters: the whole pytree for ProtoNets, the ``backbone`` entry otherwise (under
    ``model`` for the MAML family and Reptile)."""
    model = params["model"] if isinstance(params, dict) and "model" in params else params
    return model["backbone"] if isinstance(model, dict) and "backbone" in model else model


def _embedder(config: dict, support_images: np.ndarray, bparams):
    """(embed(p, x) -> [B, D], fixed norm statistics from the support images)."""
    backbone = make_backbone(config["backbone"], config["backbone_options"])
    _, state = backbone.apply({"params": bparams}, jnp.asarray(support_images), mutable=["norm_stats"])

    def embed(p, x):
        features = backbone.apply({"params": p["backbone"], "norm_stats": p["norm_stats"]}, x)
        return features.reshape(x.shape[0], -1)

    return embed, state.get("norm_stats", {})  # {}: a backbone without BatchNorm


def omniglot_input(name: str, image_size: int) -> Input:
    """Omniglot's convention: grey levels inverted (strokes = 1), i.e. x = 1 - p / 255."""
    return Input(name, (image_size, image_size, 1), scale=-1 / 255, bias=(1.0,))


def embedding_model(config: dict, params, support: Support, metadata: dict) -> Exportable:
    """The embedding network alone: image -> feature vector (for on-device prototypes)."""
    bparams = _backbone_params(config, params)
    embed, stats = _embedder(config, support.norm_images, bparams)
    image = omniglot_input("image", support.images.shape[1])
    return Exportable(
        "embedding", lambda p, x: (embed(p, x),), {"backbone": bparams, "norm_stats": stats}, [image], ["embedding"],
        f"{config['method']} embedding network ({config['backbone']}): image -> feature vector; BatchNorm "
        f"statistics fixed from {support.source}", metadata, (_examples(support),))


def classifier_model(config: dict, params, support: Support, metadata: dict) -> Exportable:
    """A complete classifier with the support set baked in: image -> class probabilities.

    ProtoNets: softmax over negative squared distances (or scaled cosine) to the class means,
    as in training; Matching Networks (without full-context embeddings): cosine attention over
    the support embeddings summed per class.
    """
    method, options = config["method"], config["method_options"]
    if method not in ("protonet", "matching") or options.get("full_context"):
        raise ExportError(f"a complete classifier can be exported for protonet and matching (without full_context) "
                          f"runs; this run's method is {method!r} {options}: export its embedding network instead "
                          f"(--model embedding)")
    bparams = _backbone_params(config, params)
    embed, stats = _embedder(config, support.norm_images, bparams)
    baked = {"backbone": bparams, "norm_stats": stats}
    support_emb = embed(baked, jnp.asarray(support.images))
    onehot = jnp.eye(len(support.class_names), dtype=jnp.float32)[support.labels]
    normalise = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True).clip(1e-8)
    if method == "protonet":
        baked["prototypes"] = (onehot.T @ support_emb) / onehot.sum(0)[:, None]
        if options.get("distance", "sqeuclidean") == "cosine":
            logits = lambda p, q: 10.0 * normalise(q) @ normalise(p["prototypes"]).T
        else:
            # ||q - p||^2 summed directly: the expanded form of training cancels catastrophically in float32
            logits = lambda p, q: -jnp.sum(jnp.square(q[:, None, :] - p["prototypes"][None]), -1)

        def apply(p, x):
            return (jax.nn.softmax(logits(p, embed(p, x)), -1),)
    else:
        baked["support"], baked["onehot"] = normalise(support_emb), onehot
        scale = float(options.get("scale", 1.0))

        def apply(p, x):
            return (jax.nn.softmax(scale * normalise(embed(p, x)) @ p["support"].T, -1) @ p["onehot"],)

    metadata = {**metadata, "class_labels": json.dumps(support.class_names)}
    return Exportable(
        "classifier", apply, baked, [omniglot_input("image", support.images.shape[1])], ["class_probabilities"],
        f"{method} few-shot classifier ({config['backbone']}), {len(support.class_names)} classes from "
        f"{support.source}: image -> class probabilities", metadata, (_examples(support),), support.class_names)


def _examples(support: Support) -> np.ndarray:
    """Real inputs for parity checks: the queries if any, else the support images."""
    return support.queries if len(support.queries) else support.images


def check_image_size(height_width: tuple[int, int], expected: tuple[int, int], name: str) -> None:
    """Refuse an image of another size than the model's: resizing is left to the user."""
    height, width = height_width
    if (height, width) != tuple(expected):
        raise DataError(f"{name} is {width}x{height} but the model takes {expected[1]}x{expected[0]} images")


def load_class_folders(directory: Path, image_size: int) -> Support:
    """A support set from ``directory/<class name>/*.png``: one folder per class, Omniglot-style
    images (dark strokes on white; decoded to strokes = 1) of exactly ``image_size`` pixels."""
    from PIL import Image

    from fsl_jax.data.fss import check_opaque

    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"support directory {directory} does not exist")
    classes = sorted(p for p in directory.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"support directory {directory} has {len(classes)} class folder(s); a classifier needs at "
                        f"least two ({directory}/<class>/*.png)")
    images, labels = [], []
    for label, folder in enumerate(classes):
        files = sorted(folder.glob("*.png"))
        if not files:
            raise DataError(f"support class folder {folder} holds no .png image")
        for path in files:
            try:
                with Image.open(path) as im:
                    check_opaque(im, f"support image {path}")
                    pixels = np.asarray(im.convert("L"), dtype=np.float32)
            except OSError as err:
                raise DataError(f"support image {path} cannot be read: {err}") from err
            check_image_size(pixels.shape, (image_size, image_size), f"support image {path}")
            images.append(1.0 - pixels[..., None] / 255.0)
            labels.append(label)
    return Support(np.stack(images), np.array(labels, np.int32), [c.name for c in classes],
                   np.zeros((0, image_size, image_size, 1), np.float32), f"support set {directory}")


def held_out_support(experiment, ways: int | None = None, shots: int | None = None) -> Support:
    """The first evaluation episode of the run's held-out alphabets (its queries serve as examples)."""
    from fsl_jax.data import character_splits

    sampler = experiment.eval_sampler(episodes_per_batch=1, ways=ways, shots=shots)
    episode = sampler.sample(0)
    _, chars = character_splits(experiment.config)
    names = [f"{chars.alphabets[c]}/{chars.characters[c]}" for c in episode.classes[0]]
    return Support(episode.support_x[0], episode.support_y[0], names, episode.query_x[0],
                   f"the first held-out episode ({sampler.ways}-way {sampler.shots}-shot, alphabets "
                   f"{', '.join(experiment.config['data']['test_alphabets'])})")
