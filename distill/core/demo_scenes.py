"""The demo's procedural scenes: one main shape (the image's class) and up to two smaller shapes of other
classes on a cluttered background, sampled from a numpy Generator and rendered to an RGB image.

Colour and texture are drawn independently of the class, so a model must learn shape. Every image has its
own Generator seeded by (seed, split, class, index) (`image_rng`): the same seed gives the same scene, in
any order or process. distill.core.demo_data writes these scenes as a dataset.
"""
from __future__ import annotations

import colorsys
import dataclasses
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

# Class order of the shape families: `num_classes=N` takes the first N. Label indices are the
# alphabetical order of the names taken, which is the order torchvision's ImageFolder assigns.
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "hexagon", "crescent",
          "heart", "arrow", "frame", "semicircle")

SPLIT_CODES = {"train": 0, "val": 1, "unlabeled": 2, "pool_kind": 3}
SUPERSAMPLE = 4                        # masks are drawn at 4x and box-filtered: anti-aliased edges
JPEG_QUALITY = (45, 95)
# Difficulty. Each nuisance (distractors, clutter lines, patterned fills) is present in only part of
# the images, so clean and cluttered scenes mix. Measured with a 4-conv CNN from scratch (8 classes,
# chance 12.5%): 60/class at 96 px -> 20-35% val top-1 after 30 epochs (it overfits: too few images);
# 300/class at 64 px -> ~50% after 10 epochs and still climbing, train and val close.
MAIN_RADIUS = (0.24, 0.40)             # fraction of the image side
DISTRACTOR_RADIUS = (0.07, 0.13)       # always smaller than the main object
DISTRACTOR_COUNT_P = (0.5, 0.3, 0.2)   # P(0, 1, 2 distractors)
CLUTTER_LINES_P, MAX_CLUTTER_LINES = 0.35, 4
PATTERNED_P = 0.5                      # else a solid (noisy) fill
OBJECT_CONTRAST = 100                  # min RGB distance of an object's colour from the background under it
PATTERN_CONTRAST = 70                  # max per-channel offset of a pattern's second colour
BACKGROUND_CONTRAST = 90               # same, for the background's gradient / blotches
MAX_NOISE = 12                         # max std of per-pixel noise in a fill
PATTERN_KINDS = ("stripes", "checks", "blotches", "gradient")
BACKGROUND_KINDS = ("solid", "gradient", "blotches")


@dataclasses.dataclass(frozen=True)
class Fill:
    """How an object's (or the background's) pixels are coloured; `seed` drives its noise."""
    kind: str
    colors: tuple            # two RGB triples, floats 0..255
    angle: float             # radians, for stripes / checks / gradient
    period: float            # pixels, for stripes / checks; grid cells for blotches
    noise: float             # std of per-pixel noise
    seed: int


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    center: tuple            # (x, y) in pixels
    radius: float            # pixels; the unit geometry has max radius 1
    rotation: float          # radians
    aspect: float            # x stretched by aspect, y by 1/aspect (before rotation)
    fill: Fill
    box: tuple               # (x0, y0, x1, y1), x1/y1 exclusive: the pixels the mask touches


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything needed to draw one image; objects[0] is the main object (the image's class)."""
    size: int
    background: Fill
    lines: tuple             # clutter lines: (x0, y0, x1, y1, width, (r, g, b))
    objects: tuple
    jpeg_quality: int

    def without(self, index: int) -> "Scene":
        return dataclasses.replace(self, objects=self.objects[:index] + self.objects[index + 1:])


# ---------------------------------------------------------------------------------------------------
# Geometry: each shape is solid polygons minus hole polygons, in unit coordinates (max radius 1).

def _circle(r, cx=0.0, cy=0.0, n=64):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _regular(n, r=1.0, phase=-np.pi / 2):
    t = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _star(points, outer, inner):
    t = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _heart(n=64):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) / 16
    return np.stack([x, y], 1)


@lru_cache(maxsize=None)
def shape_geometry(shape: str) -> tuple:
    """(solids, holes): lists of (N, 2) polygons, centred on their bounding box, max radius 1."""
    w = 0.3
    solids, holes = {
        "circle": ([_circle(1.0)], []),
        "square": ([_regular(4, 1.0, np.pi / 4)], []),
        "triangle": ([_regular(3)], []),
        "star": ([_star(5, 1.0, 0.42)], []),
        "ring": ([_circle(1.0)], [_circle(0.6)]),
        "cross": ([np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1),
                             (-w, w), (-1, w), (-1, -w), (-w, -w)], float)], []),
        "hexagon": ([_regular(6)], []),
        "crescent": ([_circle(1.0)], [_circle(0.82, cx=0.45)]),
        "heart": ([_heart()], []),
        "arrow": ([np.array([(-1, -0.2), (0.15, -0.2), (0.15, -0.55), (1, 0), (0.15, 0.55),
                             (0.15, 0.2), (-1, 0.2)], float)], []),
        "frame": ([_regular(4, 1.0, np.pi / 4)], [_regular(4, 0.62, np.pi / 4)]),
        "semicircle": ([_circle(1.0)[:33]], []),   # t in [0, pi]: the lower half-disc
    }[shape]
    pts = np.concatenate(solids)
    center = (pts.min(0) + pts.max(0)) / 2
    scale = np.sqrt(((pts - center) ** 2).sum(1)).max()
    return [(p - center) / scale for p in solids], [(p - center) / scale for p in holes]


def _placed(points, obj: SceneObject):
    x, y = points[:, 0] * obj.aspect * obj.radius, points[:, 1] / obj.aspect * obj.radius
    c, s = np.cos(obj.rotation), np.sin(obj.rotation)
    return np.stack([obj.center[0] + c * x - s * y, obj.center[1] + s * x + c * y], 1)


def object_mask(obj: SceneObject, size: int) -> Image.Image:
    """Coverage of `obj` as a (size, size) 'L' image, 0..255, anti-aliased by supersampling."""
    mask = Image.new("L", (size, size), 0)
    reach = obj.radius * max(obj.aspect, 1 / obj.aspect) + 1     # the shape lies within this square
    x0, y0 = (max(0, int(np.floor(c - reach))) for c in obj.center)
    x1, y1 = (min(size, int(np.ceil(c + reach))) for c in obj.center)
    if x0 >= x1 or y0 >= y1:
        return mask
    local = Image.new("L", ((x1 - x0) * SUPERSAMPLE, (y1 - y0) * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(local)
    solids, holes = shape_geometry(obj.shape)
    for polys, value in ((solids, 255), (holes, 0)):
        for poly in polys:
            # PIL puts pixel centres at integers; ours (COCO's) are at +0.5, hence the shift
            points = (_placed(poly, obj) - (x0, y0)) * SUPERSAMPLE - 0.5
            draw.polygon([tuple(p) for p in points], fill=value)
    mask.paste(local.resize((x1 - x0, y1 - y0), Image.Resampling.BOX), (x0, y0))
    return mask


# ---------------------------------------------------------------------------------------------------
# Pixels: fills, background, compositing.

@lru_cache(maxsize=8)
def _pixel_centers(size: int):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return xx, yy


def _fill_pixels(fill: Fill, size: int, box=None) -> np.ndarray:
    """float32 (h, w, 3) pixels of the fill over `box` (x0, y0, x1, y1; default the whole canvas)."""
    x0, y0, x1, y1 = box or (0, 0, size, size)
    rng = np.random.default_rng(fill.seed)
    c1, c2 = (np.asarray(c, np.float32) for c in fill.colors)
    xx, yy = (a[y0:y1, x0:x1] for a in _pixel_centers(size))
    u = xx * np.cos(fill.angle) + yy * np.sin(fill.angle)
    v = -xx * np.sin(fill.angle) + yy * np.cos(fill.angle)
    if fill.kind == "solid":
        t = np.zeros_like(u)
    elif fill.kind == "stripes":
        t = np.floor(u / fill.period) % 2
    elif fill.kind == "checks":
        t = (np.floor(u / fill.period) + np.floor(v / fill.period)) % 2
    elif fill.kind == "gradient":      # across the canvas, so a box shows its part of it
        reach = size * (abs(np.cos(fill.angle)) + abs(np.sin(fill.angle)))
        t = (u - min(0.0, size * np.cos(fill.angle))) / reach   # angle in [0, pi)
    elif fill.kind == "blotches":
        cells = max(2, int(fill.period))
        grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        t = np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC), np.float32)[y0:y1, x0:x1] / 255
    else:
        raise ValueError(fill.kind)
    out = c1 + t[..., None] * (c2 - c1)
    if fill.noise > 0:
        out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(fill.noise)
    return out


@lru_cache(maxsize=4)                  # sampling and rendering a scene both need it
def _background_pixels(background: Fill, lines: tuple, size: int) -> np.ndarray:
    canvas = Image.fromarray(np.clip(np.rint(_fill_pixels(background, size)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for x0, y0, x1, y1, width, color in lines:
        draw.line([(x0, y0), (x1, y1)], fill=tuple(int(c) for c in color), width=width)
    pixels = np.asarray(canvas, np.float32)
    pixels.flags.writeable = False
    return pixels


def render_scene(scene: Scene) -> Image.Image:
    """Draw the scene as an RGB image (before JPEG compression)."""
    out = _background_pixels(scene.background, scene.lines, scene.size).copy()
    for obj in scene.objects:           # outside its box an object's coverage is 0: blend the box only
        x0, y0, x1, y1 = obj.box
        alpha = np.asarray(object_mask(obj, scene.size), np.float32)[y0:y1, x0:x1, None] / 255
        region = out[y0:y1, x0:x1]
        out[y0:y1, x0:x1] = region * (1 - alpha) + _fill_pixels(obj.fill, scene.size, obj.box) * alpha
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------
# Sampling a scene.

def _random_color(rng) -> tuple:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.15, 1.0), rng.uniform(0.2, 1.0))
    return (255 * r, 255 * g, 255 * b)


def _random_fill(rng, kind, size, contrast, avoid=None, noise: float = 1.0) -> Fill:
    """A fill of `kind`; its colour keeps OBJECT_CONTRAST from `avoid` (the RGB mean under it) if given."""
    for _ in range(50):
        c1 = _random_color(rng)
        if avoid is None or np.linalg.norm(np.subtract(c1, avoid)) >= OBJECT_CONTRAST:
            break
    c2 = tuple(float(v) for v in np.clip(np.add(c1, rng.uniform(-contrast, contrast, 3)), 0, 255))
    # stripes / checks: a period of 3-9 px at 96 px, scaled with the image; blotches: 2-6 grid cells
    period = rng.uniform(3, 9) * size / 96 if kind in ("stripes", "checks") else rng.uniform(2, 6)
    return Fill(kind=kind, colors=(c1, c2), angle=float(rng.uniform(0, np.pi)), period=float(period),
                noise=float(rng.uniform(0, MAX_NOISE)) * noise, seed=int(rng.integers(2**63)))


def _random_object(rng, shape, radius, size, margin) -> SceneObject:
    lo, hi = margin * radius, size - margin * radius
    center = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
    obj = SceneObject(shape=shape, center=center, radius=radius,
                      rotation=float(rng.uniform(0, 2 * np.pi)), aspect=float(rng.uniform(0.85, 1.18)),
                      fill=None, box=None)
    return dataclasses.replace(obj, box=object_mask(obj, size).getbbox())


def _apart(a, b, gap=2) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def sample_scene(rng: np.random.Generator, label: int, classes, size: int, clutter: float = 1.0) -> Scene:
    """One scene whose main object is `classes[label]`, with 0-2 smaller, non-overlapping distractors.

    `clutter` in [0, 1] scales how often each nuisance appears (distractors, clutter lines, patterned
    fills, pixel noise): 1 is the full difficulty, 0 clean shapes on plain or gradient backgrounds. The
    same number of random draws is made at any value, so clutter=1 reproduces the default images.
    """
    background = _random_fill(rng, str(rng.choice(BACKGROUND_KINDS)), size, BACKGROUND_CONTRAST, noise=clutter)
    lines = []
    if rng.random() < CLUTTER_LINES_P * clutter:
        for _ in range(int(rng.integers(1, MAX_CLUTTER_LINES + 1))):
            x0, y0, x1, y1 = (float(v) for v in rng.uniform(-0.2, 1.2, 4) * size)
            width = int(rng.integers(1, 1 + max(1, size // 48)))
            lines.append((x0, y0, x1, y1, width, tuple(int(c) for c in _random_color(rng))))
    scene = Scene(size=size, background=background, lines=tuple(lines), objects=(),
                  jpeg_quality=int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))
    placed = [_random_object(rng, classes[label], rng.uniform(*MAIN_RADIUS) * size, size, margin=0.85)]
    others = [c for i, c in enumerate(classes) if i != label]
    count_p = np.array(DISTRACTOR_COUNT_P) * clutter + np.eye(len(DISTRACTOR_COUNT_P))[0] * (1 - clutter)
    count = int(rng.choice(len(DISTRACTOR_COUNT_P), p=count_p)) if others else 0
    for _ in range(count):
        shape, radius = str(rng.choice(others)), rng.uniform(*DISTRACTOR_RADIUS) * size
        for _ in range(20):      # rejection: distractors never overlap, so every box is fully visible
            obj = _random_object(rng, shape, radius, size, margin=0.6)
            if obj.box is not None and all(_apart(obj.box, p.box) for p in placed):
                placed.append(obj)
                break
    bg = _background_pixels(background, scene.lines, size)
    objects = []
    for obj in placed:
        x0, y0, x1, y1 = obj.box
        kind = str(rng.choice(PATTERN_KINDS)) if rng.random() < PATTERNED_P * clutter else "solid"
        fill = _random_fill(rng, kind, size, PATTERN_CONTRAST, avoid=bg[y0:y1, x0:x1].reshape(-1, 3).mean(0),
                            noise=clutter)
        objects.append(dataclasses.replace(obj, fill=fill))
    return dataclasses.replace(scene, objects=tuple(objects))


def image_rng(seed: int, split: str, index: int, label: int | None = None) -> np.random.Generator:
    """The Generator for one image, independent of every other image (parallel-safe)."""
    entropy = [seed, SPLIT_CODES[split], index] + ([] if label is None else [label])
    return np.random.default_rng(np.random.SeedSequence(entropy))


def labeled_scene(seed: int, split: str, label: int, index: int, classes, image_size: int,
                  clutter: float = 1.0) -> Scene:
    """The scene of the `index`-th image of class `label` in `split`, as `generate` writes it."""
    return sample_scene(image_rng(seed, split, index, label), label, classes, image_size, clutter)


def unlabeled_scene(seed: int, index: int, classes, image_size: int, clutter: float = 1.0,
                    empty: float = 0.0) -> Scene:
    """The `index`-th pool image: a scene of a random class, or with probability `empty` the same scene
    without its main object (an off-topic image: background, clutter and small distractors only)."""
    rng = image_rng(seed, "unlabeled", index)
    scene = sample_scene(rng, int(rng.integers(len(classes))), classes, image_size, clutter)
    return scene.without(0) if is_off_topic(seed, index, empty) else scene


def is_off_topic(seed: int, index: int, empty: float) -> bool:
    """Whether the `index`-th pool image has no main object (its own stream: other images are unchanged)."""
    return empty > 0 and bool(image_rng(seed, "pool_kind", index).random() < empty)
