"""fsl_jax: few-shot classification and segmentation in JAX/Flax, exported to Core ML."""
from fsl_jax.data.episodes import Episode, EpisodeSampler
from fsl_jax.learner import Learner

__version__ = "0.1.0"
__all__ = ["Episode", "EpisodeSampler", "Learner", "__version__"]
