"""Few-shot segmenters: pure functions of Flax parameters, as :class:`~fsl_jax.learner.Learner` objects.

Each segments one task (a :class:`~fsl_jax.data.segmentation.SegEpisode` without its task
axis): ``task_predict`` gives foreground logits ``[Q, H, W]`` for the query images, and
``task_loss`` a pixel-wise loss with ``iou`` and ``accuracy`` (pixel accuracy) as metrics.
"""
from fsl_jax.seg.prototype import prototype_segmenter
from fsl_jax.seg.siamese_unet import siamese_unet

__all__ = ["prototype_segmenter", "siamese_unet"]
