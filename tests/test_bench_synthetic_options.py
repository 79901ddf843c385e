"""bench/synthetic_options.py, the generator options of the ablations (hue_jitter, texture):
they change only what they say, draw their random values so that the objects (class, place,
size, angle) stay those of the default images, and leave the generator as it was."""
import colorsys
from pathlib import Path

import numpy as np
import scipy.io

from bench.synthetic_options import hue_jitter, texture
from common import synthetic
from common.synthetic import _render_with_box, class_style, make_cars196

SIZE = (96, 72)


def _boxes(root: Path) -> list[tuple[int, ...]]:
    a = scipy.io.loadmat(root / "cars_annos.mat")["annotations"][0]
    return [tuple(int(r[k][0, 0]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")) for r in a]


def _images(root: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted((root / "car_ims").glob("*.jpg"))}


def test_options_keep_the_objects_and_change_the_pixels(tmp_path: Path) -> None:
    settings = dict(num_classes=4, per_class=3, image_size=SIZE, seed=5)
    default = make_cars196(tmp_path / "default", **settings)
    for name, option in (("textured", texture(40.0, seed=5)), ("jittered", hue_jitter(0.5))):
        with option:
            other = make_cars196(tmp_path / name, **settings)
        assert _boxes(other) == _boxes(default)  # same objects in the same places
        assert all(a != b for a, b in zip(_images(default).values(), _images(other).values())), name
    # Out of the blocks the generator is the default one again.
    assert _images(make_cars196(tmp_path / "after", **settings)) == _images(default)
    assert synthetic.HUE_JITTER == 0.02


def test_texture_adds_a_grey_grating_to_the_background_only() -> None:
    plain, box = _render_with_box(0, np.random.default_rng(0), SIZE, scene=True)  # a disc
    with texture(40.0, seed=0):
        textured, box_t = _render_with_box(0, np.random.default_rng(0), SIZE, scene=True)
    assert box_t == box
    diff = textured.astype(int) - plain.astype(int)
    x0, y0, x1, y1 = box
    qx, qy = (x1 - x0) // 4, (y1 - y0) // 4
    assert not diff[y0 + qy:y1 - qy, x0 + qx:x1 - qx].any()  # the disc's middle is untouched
    # Elsewhere grey: the same offset in R, G and B where nothing was clipped, at most the
    # amplitude, and of its scale on average (a sine's RMS is amplitude / sqrt 2 = 28).
    unclipped = (plain > 45).all(axis=2) & (plain < 210).all(axis=2)
    d = diff[unclipped & (diff != 0).any(axis=2)]
    assert len(d) > 0.5 * unclipped.sum()
    assert np.abs(d[:, 0] - d[:, 1]).max() <= 1 and np.abs(d[:, 0] - d[:, 2]).max() <= 1
    assert np.abs(d).max() <= 41 and 20 < np.sqrt((d.astype(float) ** 2).mean()) < 35


def _object_hue(class_id: int, seed: int) -> float:
    image, (x0, y0, x1, y1) = _render_with_box(class_id, np.random.default_rng(seed), (160, 120), scene=True)
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    r, g, b = image[cy - 2:cy + 3, cx - 2:cx + 3].reshape(-1, 3).mean(0) / 255  # inside a disc
    return colorsys.rgb_to_hsv(r, g, b)[0]


def test_hue_jitter_spreads_the_object_hue_around_the_class_hue() -> None:
    class_hue = class_style(0)[1]  # a disc: its box centre lies on the object
    wheel = lambda h: min(abs(h - class_hue), 1 - abs(h - class_hue))  # noqa: E731
    default = [wheel(_object_hue(0, s)) for s in range(12)]
    with hue_jitter(0.5):
        spread = [wheel(_object_hue(0, s)) for s in range(12)]
    assert max(default) < 0.06, default  # 0.02 of jitter plus pixel noise
    assert max(spread) > 0.25, spread  # uniform on the wheel: 12 draws leave [-0.25, 0.25]
