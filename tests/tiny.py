"""The tiny protonet run the training, CLI and export tests share: 6 steps on Omniglot, a checkpoint every 3."""
from __future__ import annotations

from fsl_jax.config import load_config

TINY = ["episode.ways=5", "episode.queries=5", "backbone_options={width: 16}", "train.steps=6",
        "train.log_every=1", "train.checkpoint_every=3", "eval.every=3", "eval.curve_episodes=4", "eval.episodes=20"]


def tiny_config(tmp_path, *extra, name="run"):
    """The tiny run's config, ``extra`` overrides added, training into ``tmp_path / name``."""
    return load_config(None, TINY + [f"out={tmp_path / name}", *extra])
