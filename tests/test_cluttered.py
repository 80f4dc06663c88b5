"""Cluttered Omniglot scenes and Omniglot K-shot scene episodes: protocol, determinism, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from fsl_jax.data import cluttered
from fsl_jax.data.cluttered import ClutteredOmniglot, Glyphs, OmniglotSceneEpisodes, max_distractors, render
from fsl_jax.data.omniglot import CharacterSet, split
from fsl_jax.data.segmentation import check_episode, load_episodes, save_episodes
from fsl_jax.errors import DataError


@pytest.fixture(scope="module")
def held_out(omniglot105) -> CharacterSet:
    return split(omniglot105)[1]


def spy_render(monkeypatch):
    """Record the arguments of every render call."""
    calls = []
    original = cluttered.render

    def recording(glyphs, chars, drawers, *args, **kwargs):
        calls.append({"chars": chars.copy(), "drawers": drawers.copy(), "scene_of": args[3].copy()})
        return original(glyphs, chars, drawers, *args, **kwargs)

    monkeypatch.setattr(cluttered, "render", recording)
    return calls


def test_scenes_follow_the_protocol(held_out, monkeypatch):
    calls = spy_render(monkeypatch)
    sampler = ClutteredOmniglot(held_out, distractors=(4, 32), tasks=6, seed=3, drawers=cluttered.TEST_DRAWERS)
    episode = check_episode(sampler.sample(0))
    assert episode.support_x.shape == (6, 1, 32, 32, 3) and episode.query_x.shape == (6, 1, 96, 96, 3)
    assert episode.query_mask.shape == (6, 1, 96, 96) and episode.query_x.dtype == np.float32
    assert set(episode.distractors.tolist()) <= {4, 32}
    assert 0.0 <= episode.query_x.min() and episode.query_x.max() <= 1.0
    scene_call, exemplar_call = calls
    counts = np.bincount(scene_call["scene_of"])
    np.testing.assert_array_equal(counts, episode.distractors + 1)  # D distractors and the target per scene
    last = np.cumsum(counts) - 1
    np.testing.assert_array_equal(scene_call["chars"][last], episode.classes)  # the target is pasted last
    for scene in range(6):  # distractors are other characters
        assert episode.classes[scene] not in scene_call["chars"][scene_call["scene_of"] == scene][:-1]
    assert set((scene_call["drawers"] + 1).tolist()) <= set(cluttered.TEST_DRAWERS)
    np.testing.assert_array_equal(exemplar_call["chars"], episode.classes)  # exemplar: same character and drawer
    np.testing.assert_array_equal(exemplar_call["drawers"], scene_call["drawers"][last])
    assert (episode.query_mask.reshape(6, -1).sum(1) > 0).all() and (episode.support_mask.reshape(6, -1).sum(1) > 0).all()


def test_ground_truth_is_the_target_alone(held_out):
    glyphs = Glyphs(held_out, 32)
    rng = np.random.default_rng(0)
    n = 9
    chars, drawers = rng.integers(held_out.num_classes, size=n), rng.integers(10, size=n)
    affine, colours, place = cluttered.random_affine(rng, n), rng.random((n, 3)), rng.random((n, 2))
    _, top = render(glyphs, chars, drawers, affine, colours, place, np.zeros(n, int), 1, 96)
    image, alone = render(glyphs, chars[-1:], drawers[-1:], affine[-1:], colours[-1:], place[-1:], np.zeros(1, int), 1, 96)
    np.testing.assert_array_equal(top[0] == n - 1, alone[0] == 0)  # nothing covers the target, it covers others
    assert (top[0] >= 0).sum() > (alone[0] >= 0).sum()
    ratio = image[0][alone[0] == 0] / colours[-1]  # each pixel is an intensity times the character's colour
    np.testing.assert_allclose(ratio, ratio[:, :1].repeat(3, 1), rtol=1e-4)
    assert (ratio > cluttered.INK - 1e-6).all() and (ratio <= 1 + 1e-6).all()


def test_later_characters_cover_earlier_ones(held_out):
    glyphs = Glyphs(held_out, 32)
    same = np.zeros(2, int)
    affine = np.repeat(np.eye(2)[None], 2, 0)
    colours = np.array([[1.0, 0, 0], [0, 0, 1.0]])
    image, top = render(glyphs, same, same, affine, colours, np.full((2, 2), 0.5), same, 1, 48)
    assert (top[top >= 0] == 1).all()  # the same glyph at the same place: all blue
    assert image[0][..., 0].max() == 0 and image[0][..., 2].max() > 0.9


def test_batches_are_reproducible(held_out):
    a = ClutteredOmniglot(held_out, tasks=3, seed=1, distractors=(8,))
    b = ClutteredOmniglot(held_out, tasks=3, seed=1, distractors=(8,))
    for x, y in zip(a.sample(5), b.sample(5)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.sample(5).query_x, a.sample(6).query_x)
    assert not np.array_equal(a.sample(5).query_x, ClutteredOmniglot(held_out, tasks=3, seed=2, distractors=(8,)).sample(5).query_x)


def test_k_shot_episodes_show_one_character_by_different_drawers(held_out, monkeypatch):
    calls = spy_render(monkeypatch)
    sampler = OmniglotSceneEpisodes(held_out, shots=5, queries=5, tasks=2, distractors=(3,), scene_size=48,
                                    char_size=16, drawers=cluttered.TEST_DRAWERS)
    episode = check_episode(sampler.sample(0))
    assert episode.support_x.shape == (2, 5, 48, 48, 3) and episode.query_mask.shape == (2, 5, 48, 48)
    call = calls[0]
    last = np.cumsum(np.bincount(call["scene_of"])) - 1
    targets, drawers = call["chars"][last].reshape(2, 10), call["drawers"][last].reshape(2, 10)
    np.testing.assert_array_equal(targets, np.repeat(episode.classes[:, None], 10, 1))
    assert all(len(set(row)) == 10 for row in drawers.tolist())  # every scene another drawer


def test_fixed_sets_round_trip_through_npy(held_out, tmp_path):
    episodes = ClutteredOmniglot(held_out, tasks=4, distractors=(16,)).sample(0)
    loaded = load_episodes(save_episodes(episodes, tmp_path / "test_d16"))
    np.testing.assert_allclose(loaded.query_x, episodes.query_x, atol=0.5 / 255)
    np.testing.assert_array_equal(loaded.query_mask, episodes.query_mask)
    np.testing.assert_array_equal(loaded.distractors, episodes.distractors)
    assert sorted(p.name for p in (tmp_path / "test_d16").iterdir()) == sorted(f"{f}.npy" for f in episodes._fields)


def test_scene_smaller_than_exemplar_is_an_error(held_out):
    with pytest.raises(DataError, match="scene_size=24 is smaller than exemplar_size=32"):
        ClutteredOmniglot(held_out, scene_size=24, exemplar_size=32)


def test_more_distractors_than_the_scene_holds_is_an_error(held_out):
    assert max_distractors(96) >= 256  # the published levels fit
    with pytest.raises(DataError, match=r"distractors=600 is more than a 96x96 scene can hold"):
        ClutteredOmniglot(held_out, distractors=(4, 600))
    with pytest.raises(DataError, match=r"distractors=64 is more than a 32x32 scene"):
        OmniglotSceneEpisodes(held_out, distractors=(64,), scene_size=32, char_size=16)


def test_no_distractor_level_or_bad_drawers_is_an_error(held_out):
    with pytest.raises(DataError, match="distractors must name at least one number of distractors per scene"):
        ClutteredOmniglot(held_out, distractors=())
    with pytest.raises(DataError, match=r"drawers must be distinct numbers in 1..20, got \[\]"):
        ClutteredOmniglot(held_out, drawers=())


def test_too_many_shots_for_the_drawers_is_an_error(held_out):
    with pytest.raises(DataError, match="shots\\+queries=11 is larger than the 10 drawers"):
        OmniglotSceneEpisodes(held_out, shots=5, queries=6)


def test_blank_character_is_named():
    images = np.zeros((2, 20, 20, 20), np.float32)
    images[:, :, 5:15, 9:11] = 1
    images[1, 3] = 0
    chars = CharacterSet(images, ("A", "A"), ("character01", "character02"))
    with pytest.raises(DataError, match="A/character02 drawer 4 has no strokes"):
        Glyphs(chars, 8)


def test_throughput_is_reported(held_out):
    assert ClutteredOmniglot(held_out, tasks=4, distractors=(32,)).throughput(batches=2) > 0


def test_balanced_sampler_gives_every_level_in_turn(held_out):
    sampler = ClutteredOmniglot(held_out, distractors=(4, 8, 16), tasks=2, balanced=True)
    levels = np.concatenate([sampler.sample(i).distractors for i in range(3)])
    np.testing.assert_array_equal(levels, [4, 8, 16, 4, 8, 16])


@pytest.mark.parametrize("sampler, char_size", [(ClutteredOmniglot, 10), (OmniglotSceneEpisodes, 8)])
def test_small_characters_are_redrawn_until_visible(held_out, sampler, char_size):
    # About 2% of scenes at char_size 8, and 1% of exemplars at 10, render no pixel above the ink threshold.
    episode = sampler(held_out, tasks=256, char_size=char_size, distractors=(3,)).sample(0)
    assert (episode.support_mask.reshape(256, -1).max(-1) > 0).all()
    assert (episode.query_mask.reshape(256, -1).max(-1) > 0).all()


def test_exemplars_too_small_to_see_are_refused_up_front(held_out):
    with pytest.raises(DataError, match=r"at char_size=8, 2 exemplars \(character .* drawer \d+, ...\) have no "
                                        r"pixel above the ink threshold .* raise data.char_size"):
        ClutteredOmniglot(held_out, char_size=8, drawers=range(1, 21))


def test_drawings_too_small_to_see_in_any_scene_are_refused_up_front(held_out):
    # At char_size 4, two held-out drawings have no pixel above the threshold even in the 2x copy,
    # which enlarged characters are drawn from; at 5 none (the scenes' redraws find the rest).
    with pytest.raises(DataError, match=r"at char_size=4, 2 drawings in scenes \(character .* drawer \d+, ...\) have "
                                        r"no pixel above the ink threshold .* raise data.char_size"):
        OmniglotSceneEpisodes(held_out, char_size=4, drawers=range(1, 21))
    OmniglotSceneEpisodes(held_out, char_size=5, drawers=range(1, 21))


def test_a_scene_that_never_shows_its_target_is_an_error(held_out):
    sampler = OmniglotSceneEpisodes(held_out, char_size=8)
    blank = lambda index: (np.zeros((len(index), 4, 4, 3)), np.zeros((len(index), 4, 4)))
    with pytest.raises(DataError, match="a scene's mask came out empty in 21 draws: at char_size=8 .* raise data.char_size"):
        sampler.visible(blank, 3, "scene")
