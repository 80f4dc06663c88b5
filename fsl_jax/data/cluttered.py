"""Cluttered Omniglot (Michaelis, Bethge and Ecker, ICML 2018), generated on the fly, and K-shot scenes.

The protocol of the published data set: a black scene (96x96) holds D distractor characters
and, pasted last and on top, the target. Every character gets a random RGB colour (uniform
in [0, 1]^3, multiplying its intensity) and a random affine transform: rotation up to 20
degrees, shear up to 10 degrees and independent x/y scales 2^U(-1, 1) around 32/105 of the
original size; it is cropped to its strokes and placed uniformly where it fits whole. The
exemplar (32x32) is the target character as drawn by the same drawer, with its own colour,
rotation and shear but no scale, centred. The ground truth is the target's pixels. Drawers
1-10 make training scenes, 11-20 validation and test scenes. The published levels count the
characters of a scene, target included: its level N (4, 8, ..., 256) is N - 1 distractors here.

Two deliberate differences from the published generator: distractors never repeat the
target's character (with the 64 held-out characters here a 256-distractor scene would
otherwise hold about four copies of the target, each counted as background), and a pixel
belongs to a character where its bilinearly sampled intensity exceeds :data:`INK` (the
original pastes every nonzero pixel of a nearest-neighbour warp).

Rendering is vectorised over all characters of a batch of scenes: every pixel of every
character's window is one element of flat numpy arrays (ragged, so a scene costs what its
characters cover, not D full scenes), and "last pasted wins" is a ``maximum.at`` over paint
order. Batch ``index`` depends only on ``(seed, index)``, like the classification sampler.
A scene or exemplar whose mask comes out empty (a character drawn too small to leave a pixel
above :data:`INK`: never seen at the default sizes, 2% of scenes at ``char_size`` 8) is drawn
again, so that no task asks for a character that is not there; a sampler where some drawing could
never be seen (every pixel of the copies it can be drawn from below the threshold: an exemplar's
``char_size`` copy, a scene's two) is refused when it is made.
"""
from __future__ import annotations

import time

import numpy as np

from fsl_jax.data.omniglot import CharacterSet
from fsl_jax.data.segmentation import SegEpisode
from fsl_jax.errors import DataError

INK = 0.3  # a character owns a pixel where its sampled intensity (in [0, 1]) exceeds this
MAX_ROTATION, MAX_SHEAR, MAX_SCALE = 20.0, 10.0, 2.0  # degrees, degrees, factor (the published protocol)
CELL = 4  # a scene holds at most one character per CELL x CELL pixels on average
REDRAWS = 20  # times a scene whose mask came out empty is drawn again before that is an error
DISTRACTOR_LEVELS = (4, 8, 16, 32, 64, 128, 256)
TRAIN_DRAWERS, TEST_DRAWERS = tuple(range(1, 11)), tuple(range(11, 21))


def max_distractors(scene_size: int) -> int:
    """The most distractors a scene holds: one character per ``CELL x CELL`` pixels, target included.

    Beyond that the distractor layer is many strokes deep everywhere and no longer clutter
    but noise; the published maximum, 256 characters (255 distractors) in a 96x96 scene, is 44% of this limit.
    """
    return (scene_size // CELL) ** 2 - 1


class Glyphs:
    """Characters prepared for rendering at ``char_size`` pixels per 105 original ones.

    Two area-resampled copies (2*char_size and char_size pixels square, uint8) so that no
    character is ever sampled more than 2x below the resolution of its copy along its larger
    axis, each copy's brightest pixel (``peaks``: no sample of a copy is brighter), and each image's
    stroke bounding box (fractions of the image side).
    """

    def __init__(self, chars: CharacterSet, char_size: int):
        if char_size < 4:
            raise DataError(f"char_size must be at least 4 pixels, got {char_size}")
        self.char_size, self.num_classes, self.drawers = char_size, chars.num_classes, chars.images.shape[1]
        self.sizes = (2 * char_size, char_size)
        levels = [np.pad(np.round(chars.resized(s).images * 255).astype(np.uint8), ((0, 0), (0, 0), (1, 2), (1, 2)))
                  for s in self.sizes]  # zero border: see _bilinear
        self.atlas = np.concatenate([level.ravel() for level in levels])
        self.offsets = np.cumsum([0, levels[0].size])[:2]
        self.peaks = np.stack([level.max((-2, -1)) for level in levels])  # [copy, class, drawer]: brightest pixel
        ink = chars.images > 0.5
        rows, cols = ink.any(-1), ink.any(-2)
        side = chars.images.shape[-1]
        self.boxes = np.stack([cols.argmax(-1), rows.argmax(-1), side - cols[..., ::-1].argmax(-1),
                               side - rows[..., ::-1].argmax(-1)], -1).astype(np.float32) / side  # x0 y0 x1 y1
        if not ink.any(axis=(-1, -2)).all():
            c, d = np.argwhere(~ink.any(axis=(-1, -2)))[0]
            raise DataError(f"character {chars.alphabets[c]}/{chars.characters[c]} drawer {d + 1} has no strokes")


def random_affine(rng: np.random.Generator, n: int, scaled: bool = True) -> np.ndarray:
    """[n, 2, 2] linear maps of the protocol: rotation, shear and (if ``scaled``) x/y scale 2^U(-1, 1)."""
    phi = np.radians(rng.uniform(-MAX_ROTATION, MAX_ROTATION, n))
    theta = np.radians(rng.uniform(-MAX_SHEAR, MAX_SHEAR, n))
    a, b = (MAX_SCALE ** rng.uniform(-1, 1, (2, n))) if scaled else np.ones((2, n))
    return np.stack([np.stack([a * np.cos(phi + theta), b * np.sin(phi - theta)], -1),
                     np.stack([-a * np.sin(phi + theta), b * np.cos(phi - theta)], -1)], -2)


def render(glyphs: Glyphs, chars: np.ndarray, drawers: np.ndarray, affine: np.ndarray, colours: np.ndarray,
           place: np.ndarray, scene_of: np.ndarray, scenes: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Paint characters into ``scenes`` black ``size`` x ``size`` RGB scenes.

    chars, drawers (0-based), scene_of: [n] int; affine: [n, 2, 2]; colours: [n, 3]; place: [n, 2]
    in [0, 1] (where along the free range the cropped character sits; 0.5 centres it). Characters
    are painted in array order, so within a scene later ones cover earlier ones.
    Returns images [scenes, size, size, 3] float32 and ``top`` [scenes, size, size] int, the
    index of the character that owns each pixel (-1 for background).
    """
    n = len(chars)
    forward = affine * glyphs.char_size  # image-side fractions -> scene pixels
    x0, y0, x1, y1 = glyphs.boxes[chars, drawers].T
    corners = np.stack([np.stack([x0, y0], -1), np.stack([x1, y0], -1), np.stack([x0, y1], -1),
                        np.stack([x1, y1], -1)], 1) - 0.5  # [n, 4, 2], about the image centre
    mapped = np.einsum("nij,nkj->nki", forward, corners)
    low, extent = mapped.min(1), mapped.max(1) - mapped.min(1)
    window = np.maximum(np.ceil(extent).astype(np.int64), 1)  # [n, 2] (width, height)
    corner = np.floor(place * (size - window + 1)).astype(np.int64)
    corner = np.where(window <= size, np.minimum(corner, size - window), (size - window) // 2)
    shift = corner - low  # scene = forward @ (u - 0.5) + shift, u in image-side fractions
    start, stop = np.maximum(corner, 0), np.minimum(corner + window, size)
    counts = np.prod(np.maximum(stop - start, 0), -1)

    # One element per pixel of every character's (clipped) window, in paint order.
    repeat = lambda a, dtype=np.int32: np.repeat(a.astype(dtype), counts)
    which = repeat(np.arange(n))
    local = np.arange(counts.sum(), dtype=np.int32) - repeat(np.cumsum(counts) - counts)
    width = repeat(np.maximum(stop[:, 0] - start[:, 0], 1))
    row = local // width
    px, py = repeat(start[:, 0]) + local - row * width, repeat(start[:, 1]) + row
    # Copy 0 (2x char_size) for characters enlarged along an axis, else copy 1 (column norms are the x/y scales).
    level = np.where(np.linalg.norm(affine, axis=1).max(-1) > 1, 0, 1)
    side = np.array(glyphs.sizes)[level]
    inverse = np.linalg.inv(forward) * side[:, None, None]  # scene pixels -> pixels of the copy
    origin = np.einsum("nij,nj->ni", inverse, 0.5 - shift) + side[:, None] / 2 - 0.5  # copy coords of pixel (0, 0)
    fx, fy = px.astype(np.float32), py.astype(np.float32)
    u, v = (repeat(origin[:, i], np.float32) + repeat(inverse[:, i, 0], np.float32) * fx
            + repeat(inverse[:, i, 1], np.float32) * fy for i in range(2))
    base = glyphs.offsets[level] + (chars * glyphs.drawers + drawers) * (side + 3) ** 2
    intensity = _bilinear(glyphs, repeat(base, np.int64), repeat(side), u, v)

    ink = intensity > INK
    owner = np.full(scenes * size * size, -1, np.int64)
    pixel = (scene_of[which] * size + py) * size + px
    order = np.flatnonzero(ink)  # element order is paint order within each scene
    np.maximum.at(owner, pixel[order], order)
    images = np.zeros((scenes * size * size, 3), np.float32)
    painted = owner >= 0
    element = owner[painted]
    images[painted] = intensity[element, None] * colours[which[element]]
    top = np.where(painted, which[np.maximum(owner, 0)], -1)
    return images.reshape(scenes, size, size, 3), top.reshape(scenes, size, size)


def _bilinear(glyphs: Glyphs, base, side, u, v) -> np.ndarray:
    """Bilinear samples at pixel coordinates (u, v) of the copies starting at ``base``; 0 outside them.

    Each copy carries a zero border (1 pixel before, 2 after), so clipping the coordinates into
    [-1, side] replaces every bounds test.
    """
    high = side.astype(np.float32)
    u, v = np.clip(u, -1, high), np.clip(v, -1, high)
    u0, v0 = np.floor(u), np.floor(v)
    fu, fv = u - u0, v - v0
    stride = side + 3
    index = base + (v0.astype(np.int64) + 1) * stride + u0.astype(np.int64) + 1
    atlas = glyphs.atlas
    top = atlas[index] * (1 - fu) + atlas[index + 1] * fu
    bottom = atlas[index + stride] * (1 - fu) + atlas[index + stride + 1] * fu
    return (top * (1 - fv) + bottom * fv) * np.float32(1 / 255)


class _SceneMaker:
    """Shared set-up and checks of the scene samplers below."""

    def __init__(self, chars: CharacterSet, distractors, tasks: int, seed: int, drawers, scene_size: int,
                 char_size: int):
        self.distractors = tuple(int(d) for d in np.atleast_1d(distractors))
        if not self.distractors:
            raise DataError("distractors must name at least one number of distractors per scene, got none")
        limit = max_distractors(scene_size)
        for d in self.distractors:
            if not 0 <= d <= limit:
                raise DataError(f"distractors={d} is more than a {scene_size}x{scene_size} scene can hold: at most "
                                f"{limit} (one character per {CELL}x{CELL} pixels)" if d > limit else
                                f"distractors must be >= 0, got {d}")
        if tasks < 1:
            raise DataError(f"tasks must be at least 1, got {tasks}")
        if chars.num_classes < 2:
            raise DataError(f"cluttered scenes need at least 2 characters (distractors differ from the target), "
                            f"got {chars.num_classes}")
        self.drawers = np.sort(chars.drawer_indices(drawers))
        self.glyphs = Glyphs(chars, char_size)
        self.tasks, self.seed, self.scene_size = tasks, seed, scene_size
        # A scene draws a character from one of its two copies, and bilinear samples never exceed their
        # copy's pixels: a drawing with no pixel above INK in either copy could never be seen in a scene.
        self.refuse_faint(chars, self.glyphs.peaks.max(0), "drawings in scenes")

    def refuse_faint(self, chars: CharacterSet, peaks: np.ndarray, what: str) -> None:
        """A DataError where some drawing's ``peaks`` ([class, drawer]) leave no pixel above the ink
        threshold for the sampler's drawers: its masks would always come out empty."""
        faint = np.argwhere(peaks[:, self.drawers] <= INK * 255)
        if len(faint):
            c, d = faint[0]
            raise DataError(f"at char_size={self.glyphs.char_size}, {len(faint)} {what} (character "
                            f"{chars.alphabets[c]}/{chars.characters[c]} drawer {self.drawers[d] + 1}, ...) have no "
                            f"pixel above the ink threshold and could never be seen: raise data.char_size")

    def scenes(self, rng, targets, target_drawers, levels):
        """One scene per target: ``levels[i]`` distractors (other characters) under target ``i``, drawn
        again where the target left no pixel (:meth:`visible`).

        Returns images [n, S, S, 3] and the targets' masks [n, S, S] float32.
        """
        classes = self.glyphs.num_classes

        def draw(index):
            counts = levels[index] + 1
            scene_of = np.repeat(np.arange(len(index)), counts)
            last = np.cumsum(counts) - 1
            chars = (targets[index][scene_of] + rng.integers(1, classes, len(scene_of))) % classes
            chars[last] = targets[index]
            drawers = rng.choice(self.drawers, len(scene_of))
            drawers[last] = target_drawers[index]
            images, top = render(self.glyphs, chars, drawers, random_affine(rng, len(chars)),
                                 rng.random((len(chars), 3)), rng.random((len(chars), 2)), scene_of, len(index),
                                 self.scene_size)
            return images, (top == last[:, None, None]).astype(np.float32)

        return self.visible(draw, len(targets), "scene")

    def visible(self, draw, n: int, what: str):
        """``draw(index)`` (images and masks of the scenes ``index``) for ``range(n)``, each scene whose
        mask came out empty drawn again (at most :data:`REDRAWS` times, then a DataError)."""
        images, masks = draw(np.arange(n))
        for _ in range(REDRAWS):
            empty = np.flatnonzero(masks.reshape(n, -1).max(-1) == 0)
            if not len(empty):
                return images, masks
            images[empty], masks[empty] = draw(empty)
        raise DataError(f"a {what}'s mask came out empty in {REDRAWS + 1} draws: at char_size={self.glyphs.char_size} "
                        f"characters are too small to leave a pixel above the ink threshold; raise data.char_size")

    def throughput(self, batches: int = 20) -> float:
        """Scenes per second this sampler renders on this machine (support and query scenes together)."""
        start = time.perf_counter()
        scenes = 0
        for i in range(batches):
            episode = self.sample(i)
            scenes += episode.query_x.shape[0] * (episode.query_x.shape[1] + episode.support_x.shape[1])
        return scenes / (time.perf_counter() - start)


class ClutteredOmniglot(_SceneMaker):
    """One-shot segmentation in clutter: each task a 32x32 exemplar (the support, K=1, its mask the
    exemplar's strokes) and a scene (the query, Q=1) whose target is the exemplar's character.

    distractors: the clutter levels to draw from, one per task (uniformly).
    balanced: give the levels in turn instead (task n of the stream, counting across batches, has
        level n mod len(distractors)), so an evaluation has exactly as many scenes of each.
    """

    def __init__(self, chars: CharacterSet, distractors=DISTRACTOR_LEVELS, tasks: int = 8, seed: int = 0,
                 drawers=TRAIN_DRAWERS, scene_size: int = 96, exemplar_size: int = 32, char_size: int = 32,
                 balanced: bool = False):
        if scene_size < exemplar_size:
            raise DataError(f"scene_size={scene_size} is smaller than exemplar_size={exemplar_size}: the scene must "
                            "be able to hold the exemplar's character")
        super().__init__(chars, distractors, tasks, seed, drawers, scene_size, char_size)
        self.exemplar_size, self.balanced = exemplar_size, balanced
        # An exemplar is drawn unscaled from the char_size copy alone: however rotated or sheared.
        self.refuse_faint(chars, self.glyphs.peaks[1], "exemplars")

    def sample(self, index: int) -> SegEpisode:
        """Batch number ``index`` (deterministic in ``(seed, index)``)."""
        rng = np.random.default_rng([self.seed, index])
        t = self.tasks
        targets = rng.integers(self.glyphs.num_classes, size=t)
        drawers = rng.choice(self.drawers, t)
        if self.balanced:
            levels = np.array(self.distractors)[(index * t + np.arange(t)) % len(self.distractors)]
        else:
            levels = rng.choice(self.distractors, t)
        scenes, masks = self.scenes(rng, targets, drawers, levels)

        def draw(index):
            n = len(index)
            images, top = render(self.glyphs, targets[index], drawers[index], random_affine(rng, n, scaled=False),
                                 rng.random((n, 3)), np.full((n, 2), 0.5), np.arange(n), n, self.exemplar_size)
            return images, (top >= 0).astype(np.float32)

        exemplars, exemplar_masks = self.visible(draw, t, "exemplar")
        return SegEpisode(support_x=exemplars[:, None], support_mask=exemplar_masks[:, None],
                          query_x=scenes[:, None], query_mask=masks[:, None],
                          classes=targets.astype(np.int32), distractors=levels.astype(np.int32))


class OmniglotSceneEpisodes(_SceneMaker):
    """K-shot segmentation episodes from Omniglot scenes: each task one character, K support and
    Q query scenes that show it drawn by different drawers among ``distractors`` other characters,
    with the masks of its pixels.
    """

    def __init__(self, chars: CharacterSet, shots: int = 1, queries: int = 1, tasks: int = 4, seed: int = 0,
                 drawers=TRAIN_DRAWERS, distractors=(8,), scene_size: int = 64, char_size: int = 24):
        super().__init__(chars, distractors, tasks, seed, drawers, scene_size, char_size)
        for name, value in (("shots", shots), ("queries", queries)):
            if value < 1:
                raise DataError(f"{name} must be at least 1, got {value}")
        if shots + queries > len(self.drawers):
            raise DataError(f"shots+queries={shots + queries} is larger than the {len(self.drawers)} drawers available: "
                            "support and query scenes show different drawers")
        self.shots, self.queries = shots, queries

    def sample(self, index: int) -> SegEpisode:
        """Batch number ``index`` (deterministic in ``(seed, index)``)."""
        rng = np.random.default_rng([self.seed, index])
        t, k, q = self.tasks, self.shots, self.queries
        classes = rng.integers(self.glyphs.num_classes, size=t)
        drawers = self.drawers[rng.random((t, len(self.drawers))).argsort(1)[:, : k + q]]
        levels = rng.choice(self.distractors, t)
        images, masks = self.scenes(rng, np.repeat(classes, k + q), drawers.ravel(), np.repeat(levels, k + q))
        images = images.reshape(t, k + q, *images.shape[1:])
        masks = masks.reshape(t, k + q, *masks.shape[1:])
        return SegEpisode(support_x=images[:, :k], support_mask=masks[:, :k], query_x=images[:, k:],
                          query_mask=masks[:, k:], classes=classes.astype(np.int32), distractors=levels.astype(np.int32))
