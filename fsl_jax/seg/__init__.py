"""Few-shot segmenters: pure functions of Flax parameters, as :class:`~fsl_jax.learner.Learner` objects.

Each segments one task (a :class:`~fsl_jax.data.segmentation.SegEpisode` without its task
axis): ``task_predict`` gives foreground logits ``[Q, H, W]`` for the query images, and
``task_loss`` a pixel-wise loss with ``iou`` and ``accuracy`` (pixel accuracy) as metrics.
"""
from fsl_jax.seg.maml import maml_segmenter
from fsl_jax.seg.prototype import prototype_segmenter
from fsl_jax.seg.siamese_unet import siamese_unet

__all__ = ["maml_segmenter", "prototype_segmenter", "siamese_unet"]
