"""Datasets, episode samplers and scene generators."""
from fsl_jax.data.episodes import Episode, EpisodeSampler, with_rotations
from fsl_jax.data.omniglot import CharacterSet, data_root, load_omniglot, split
from fsl_jax.data.segmentation import SegEpisode

__all__ = ["CharacterSet", "Episode", "EpisodeSampler", "SegEpisode", "data_root", "load_omniglot", "split",
           "with_rotations"]


def character_splits(config: dict) -> tuple[CharacterSet, CharacterSet]:
    """(train, test) characters a config asks for; training classes include rotations if asked."""
    from fsl_jax.errors import ConfigError

    data = config["data"]
    if data["name"] != "omniglot":
        raise ConfigError(f"unknown dataset {data['name']!r}; available: ['omniglot']")
    if data["source"] == "zips":
        chars = load_omniglot(data["dir"], data["image_size"], data["zips"])
    elif data["source"] == "tfds":
        from fsl_jax.data.download import from_tfds

        chars = from_tfds(data_dir=data["dir"]).resized(data["image_size"])
    else:
        raise ConfigError(f"unknown data.source {data['source']!r}; available: ['zips', 'tfds']")
    train, test = split(chars, data["test_alphabets"])
    return (with_rotations(train) if data["rotations"] else train), test
