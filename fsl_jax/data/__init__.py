"""Datasets, episode samplers and scene generators."""
from fsl_jax.data.episodes import Episode, EpisodeSampler, with_rotations
from fsl_jax.data.omniglot import CharacterSet, data_root, load_omniglot, split

__all__ = ["CharacterSet", "Episode", "EpisodeSampler", "data_root", "load_omniglot", "split", "with_rotations"]


def character_splits(config: dict) -> tuple[CharacterSet, CharacterSet]:
    """(train, test) characters a config asks for; training classes include rotations if asked."""
    data = config["data"]
    if data["name"] != "omniglot":
        from fsl_jax.errors import ConfigError
        raise ConfigError(f"unknown dataset {data['name']!r}; available: ['omniglot']")
    train, test = split(load_omniglot(data["dir"], data["image_size"]), data["test_alphabets"])
    return (with_rotations(train) if data["rotations"] else train), test
