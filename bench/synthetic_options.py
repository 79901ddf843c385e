"""Options of the generated data that only the ablations use, kept out of common/synthetic.py
(which makes the smoke data): a wider hue jitter (bench/at_par_ablation.py,
tests/test_at_par.py, bench/t4_phase_b_gain.py) and a grey grating on the backgrounds
(bench/t4_phase_b_gain.py). Each patches common.synthetic while its `with` block runs:

    with hue_jitter(0.2), texture(60.0, seed=1234):
        make_cars196(root, seed=1234)

They draw their random values so that the objects (class, place, size, angle) stay those of
the default images; the images are those of the generator's former keywords of the same names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from common import synthetic


@contextlib.contextmanager
def hue_jitter(value: float) -> Iterator[None]:
    """Each object's hue is its class hue +- `value` (0-1 wheel; synthetic.HUE_JITTER outside).
    At 0.2 colour is a weak class cue and the class must be read from shape and pattern, which
    takes the convolutional depth (residual branches) of a network, as real images do; at 0.5
    colour is pure nuisance. The hue is one draw per image whatever its width, so every other
    value of the image stays what it was."""
    default, synthetic.HUE_JITTER = synthetic.HUE_JITTER, value
    try:
        yield
    finally:
        synthetic.HUE_JITTER = default


@contextlib.contextmanager
def texture(amplitude: float, seed: int) -> Iterator[None]:
    """Add a grey grating of `amplitude` pixel levels to each background, of random orientation,
    frequency and phase: a class-independent nuisance in the edge and texture channels of a
    network's pooled features. Its values come from a stream of their own,
    default_rng([seed, 1]), so the images' own stream is untouched. One data set per block
    (pass its generator seed): the stream starts at the block's entry."""
    grating_rng = np.random.default_rng([seed, 1])
    background = synthetic._background

    def textured(rng: np.random.Generator, size: tuple[int, int], scene: bool) -> tuple[np.ndarray, np.ndarray]:
        plain, noise = background(rng, size, scene)
        width, height = size
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        angle = grating_rng.uniform(0.0, np.pi)
        cycles = grating_rng.uniform(3.0, 10.0) / min(width, height)  # 3-10 periods across the short side
        phase = grating_rng.uniform(0.0, 2.0 * np.pi)
        along = xs * np.cos(angle) + ys * np.sin(angle)
        return plain + (amplitude * np.sin(2.0 * np.pi * cycles * along + phase))[..., None], noise

    synthetic._background = textured
    try:
        yield
    finally:
        synthetic._background = background
