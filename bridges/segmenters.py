"""Segmenters as exportables: image(s) in, per-pixel foreground probability (``mask_probability``) out.

- Prototype segmenter: the support set's foreground and background prototypes are baked in;
  one input, the image to segment.
- Siamese-U-Net: two inputs, the exemplar (the object on black, as in the clutter protocol,
  or a support image already multiplied by its mask) and the scene.
- MAML segmenter: the U-Net with the parameters adapted to the support set (the inner loop
  run at export time, as ``predict`` runs it); one input, the image to segment.

Images are RGB in [0, 1] (8-bit pixels / 255), as the segmentation data are.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bridges.models import Exportable, Input, check_image_size
from fsl_jax.errors import DataError, ExportError
from fsl_jax.methods import make_backbone
from fsl_jax.seg.common import resize
from fsl_jax.seg.prototype import prototypes, scores

SEGMENTERS = ("prototype_segmenter", "siamese_unet", "maml_segmenter")


@dataclasses.dataclass(frozen=True)
class SegSupport:
    """Support images [K, h, w, C] in [0, 1] with binary masks [K, h, w], and real query images
    [Q, H, W, C] (their size is the exported input's; they serve as parity examples)."""

    images: np.ndarray
    masks: np.ndarray
    queries: np.ndarray
    source: str
    # BatchNorm statistics are fixed from these images (None: the support images, or, when the
    # queries have another size, the queries for the query path, as the learner normalises them apart)
    support_statistics: np.ndarray | None = None
    query_statistics: np.ndarray | None = None


def rgb_input(name: str, shape) -> Input:
    return Input(name, tuple(int(s) for s in shape), scale=1 / 255, bias=(0.0, 0.0, 0.0))


def prototype_segmenter_model(config: dict, params, support: SegSupport, metadata: dict) -> Exportable:
    """Query image -> mask probability, the support set's prototypes baked in (see
    :func:`fsl_jax.seg.prototype_segmenter`: scaled cosine to the foreground minus to the
    background prototype, bilinearly resized to the image, then the sigmoid)."""
    backbone = make_backbone(config["backbone"], config["backbone_options"])
    scale = float(config["method_options"].get("scale", 20.0))
    same_size = support.images.shape[1:] == support.queries.shape[1:]
    support_ref = support.support_statistics if support.support_statistics is not None else support.images
    query_ref = support.query_statistics if support.query_statistics is not None else (
        support.images if same_size else support.queries)
    stats = lambda images: backbone.apply({"params": params}, jnp.asarray(images), mutable=["norm_stats"])[1].get("norm_stats", {})  # {}: no BatchNorm
    support_features = backbone.apply({"params": params, "norm_stats": stats(support_ref)}, jnp.asarray(support.images))
    foreground, background = prototypes(support_features, jnp.asarray(support.masks))
    baked = {"backbone": params, "norm_stats": stats(query_ref), "foreground": foreground, "background": background}
    height, width = support.queries.shape[1:3]

    def apply(p, x):
        features = backbone.apply({"params": p["backbone"], "norm_stats": p["norm_stats"]}, x)
        logits = scores(features, p["foreground"], p["background"], scale)
        return (jax.nn.sigmoid(resize(logits[..., None], height, width)[..., 0]),)

    return Exportable(
        "prototype-segmenter", apply, baked, [rgb_input("image", support.queries.shape[1:])], ["mask_probability"],
        f"prototype segmenter ({config['backbone']}) with the prototypes of {support.source}: "
        f"{width}x{height} RGB image -> per-pixel probability of the support's class", metadata, (support.queries,))


def siamese_unet_model(config: dict, params, examples: tuple[np.ndarray, np.ndarray], metadata: dict) -> Exportable:
    """(exemplar, scene) -> mask probability of the exemplar's object in the scene."""
    from fsl_jax.seg.siamese_unet import SiameseUNet

    options = config["method_options"]
    net = SiameseUNet(tuple(options.get("widths", (16, 32, 64, 128))), options.get("upsample", "bilinear"))

    def one(p, exemplar, scene):
        mask = jnp.ones(exemplar.shape[:2], exemplar.dtype)  # the exemplar comes masked already
        logits, _, _ = net.apply({"params": p}, exemplar[None], mask[None], scene[None])  # (logits, code, features)
        return logits[0]

    def apply(p, exemplars, scenes):
        return (jax.nn.sigmoid(jax.vmap(one, in_axes=(None, 0, 0))(p, exemplars, scenes)),)

    def apply_one(p, exemplar, scene):  # no vmap: a plainer graph for Core ML's batch of one
        mask = jnp.ones(exemplar.shape[:3], exemplar.dtype)
        logits, _, _ = net.apply({"params": p}, exemplar, mask, scene)
        return (jax.nn.sigmoid(logits),)

    exemplars, scenes = examples
    return Exportable(
        "siamese-unet", apply, params, [rgb_input("exemplar", exemplars.shape[1:]), rgb_input("scene", scenes.shape[1:])],
        ["mask_probability"],
        f"Siamese-U-Net: exemplar ({exemplars.shape[2]}x{exemplars.shape[1]}, the object on black) and scene "
        f"({scenes.shape[2]}x{scenes.shape[1]}) RGB images -> per-pixel probability of the exemplar's object in the scene",
        metadata, (exemplars, scenes), apply_one=apply_one)


def maml_segmenter_model(config: dict, params, support: SegSupport, metadata: dict) -> Exportable:
    """Image -> mask probability of the U-Net adapted on the support set: ``test_inner_steps`` (else
    ``inner_steps``) of SGD on the support images and masks, as :func:`fsl_jax.seg.maml_segmenter`'s
    ``predict`` does; the exported network uses standard convolutions (the same parameters)."""
    import inspect

    from fsl_jax.meta import adapt
    from fsl_jax.nets.decoders import UNet
    from fsl_jax.seg.common import bce
    from fsl_jax.seg.maml import maml_segmenter

    defaults = {k: v.default for k, v in inspect.signature(maml_segmenter).parameters.items()}
    options = {**defaults, **config["method_options"]}
    steps = options["inner_steps"] if options["test_inner_steps"] is None else options["test_inner_steps"]
    lr = params["inner_lr"] if options["learn_inner_lr"] else options["inner_lr"]
    trained = UNet(tuple(options["widths"]), options["upsample"], im2col=options["im2col"])
    unet = UNet(tuple(options["widths"]), options["upsample"])
    adapted, _ = jax.jit(lambda p, x, y: adapt(lambda q, z: trained.apply({"params": q}, z)[..., 0], bce, p, (x, y),
                                               steps, lr, first_order=True))(
        params["unet"], jnp.asarray(support.images), jnp.asarray(support.masks))

    def apply(p, x):
        return (jax.nn.sigmoid(unet.apply({"params": p}, x)[..., 0]),)

    height, width = support.queries.shape[1:3]
    return Exportable(
        "maml-segmenter", apply, adapted, [rgb_input("image", support.queries.shape[1:])], ["mask_probability"],
        f"MAML U-Net segmenter adapted ({steps} SGD steps) on {support.source}: {width}x{height} RGB image -> "
        "per-pixel probability of the support's class", metadata, (support.queries,))


def held_out_seg_support(experiment, examples: int = 8) -> SegSupport:
    """The support of the run's first held-out task; the queries of its first tasks as examples."""
    batch = experiment.eval_sampler(examples).sample(0)
    queries = batch.query_x.reshape(-1, *batch.query_x.shape[2:])[:examples]
    return SegSupport(batch.support_x[0], batch.support_mask[0], queries,
                      f"the first held-out {experiment.config['data']['name']} task")


def load_support_folder(directory: Path, size: tuple[int, int], queries: np.ndarray) -> SegSupport:
    """Support images ``directory/<n>.jpg`` with masks ``<n>.png`` (the FSS-1000 layout), each of
    exactly ``size`` (height, width) pixels: resizing is left to the user, never done silently."""
    from fsl_jax.data.fss import class_pairs, read_pair, upright_size

    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"support directory {directory} does not exist")
    images, masks = [], []
    for image_path, mask_path in class_pairs(directory):
        width, height = upright_size(image_path)
        check_image_size((height, width), size, f"support image {image_path}")
        image, mask = read_pair(image_path, mask_path, size[0])
        images.append(image.astype(np.float32) / 255.0)
        masks.append(mask.astype(np.float32))
    return SegSupport(np.stack(images), np.stack(masks), queries, f"support set {directory}")


def segmenter_model(config: dict, experiment, params, metadata: dict, support: str | Path | None) -> Exportable:
    """The exportable of a segmentation run's method."""
    method = config["method"]
    if method not in SEGMENTERS:
        raise ExportError(f"cannot export segmentation method {method!r}; exportable: {list(SEGMENTERS)}")
    held_out = held_out_seg_support(experiment)
    if method == "siamese_unet":
        if support:
            raise ExportError("the Siamese-U-Net takes its exemplar as an input: --support does not apply")
        batch = experiment.eval_sampler(len(held_out.queries)).sample(0)
        exemplars = batch.support_x[:, 0] * batch.support_mask[:, 0, ..., None]
        return siamese_unet_model(config, params, (exemplars, batch.query_x[:, 0]), metadata)
    chosen = held_out if not support else load_support_folder(support, held_out.images.shape[1:3], held_out.queries)
    if method == "maml_segmenter":
        return maml_segmenter_model(config, params, chosen, metadata)
    return prototype_segmenter_model(config, params, chosen, metadata)
