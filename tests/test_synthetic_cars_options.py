"""make_cars196's optional content parameters (hue_jitter, texture) used by
bench/t4_phase_b_gain.py: they change only what they say, and draw their random values so
that the objects (class, place, size, angle) stay those of the default images."""
import colorsys
from pathlib import Path

import numpy as np
import scipy.io

from common.synthetic import _render_with_box, class_style, make_cars196

SIZE = (96, 72)


def _boxes(root: Path) -> list[tuple[int, ...]]:
    a = scipy.io.loadmat(root / "cars_annos.mat")["annotations"][0]
    return [tuple(int(r[k][0, 0]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")) for r in a]


def test_options_keep_the_objects_and_change_the_pixels(tmp_path: Path) -> None:
    settings = dict(num_classes=4, per_class=3, image_size=SIZE, seed=5)
    default = make_cars196(tmp_path / "default", **settings)
    for name, option in (("textured", dict(texture=40.0)), ("jittered", dict(hue_jitter=0.5))):
        other = make_cars196(tmp_path / name, **settings, **option)
        assert _boxes(other) == _boxes(default)  # same objects in the same places
        images = sorted((default / "car_ims").glob("*.jpg"))
        assert all((default / "car_ims" / f.name).read_bytes() != (other / "car_ims" / f.name).read_bytes()
                   for f in images), name


def test_texture_adds_a_grey_grating_to_the_background_only() -> None:
    plain, box = _render_with_box(0, np.random.default_rng(0), SIZE, scene=True)  # a disc
    textured, box_t = _render_with_box(0, np.random.default_rng(0), SIZE, scene=True, texture=40.0)
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


def _object_hue(class_id: int, seed: int, hue_jitter: float) -> float:
    image, (x0, y0, x1, y1) = _render_with_box(class_id, np.random.default_rng(seed), (160, 120),
                                               scene=True, hue_jitter=hue_jitter)
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    r, g, b = image[cy - 2:cy + 3, cx - 2:cx + 3].reshape(-1, 3).mean(0) / 255  # inside a disc
    return colorsys.rgb_to_hsv(r, g, b)[0]


def test_hue_jitter_spreads_the_object_hue_around_the_class_hue() -> None:
    class_hue = class_style(0)[1]  # a disc: its box centre lies on the object
    wheel = lambda h: min(abs(h - class_hue), 1 - abs(h - class_hue))  # noqa: E731
    default = [wheel(_object_hue(0, s, 0.02)) for s in range(12)]
    spread = [wheel(_object_hue(0, s, 0.5)) for s in range(12)]
    assert max(default) < 0.06, default  # 0.02 of jitter plus pixel noise
    assert max(spread) > 0.25, spread  # uniform on the wheel: 12 draws leave [-0.25, 0.25]
