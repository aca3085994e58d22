"""Acquisition shift: each hospital images through its own "scanner".

Real consortia differ in detector response, exposure, post-processing and resolution, so
the same anatomy reaches the model with different intensities and sharpness. A site's
scanner is modelled, in the order the physics applies it, as

    y = clamp( gain * blur_sigma(x) ** gamma + offset + N(0, noise_std^2), 0, 1 )

- ``blur_sigma``: Gaussian point-spread function, sigma in pixels (0 = sharp);
- ``gamma``: the detector / look-up-table non-linearity (>1 darkens mid-tones);
- ``gain``, ``offset``: exposure and brightness calibration;
- ``noise_std``: detector noise, additive Gaussian.

The parameters are drawn from the site id, the seed and a ``strength`` in [0, 1]: each
site draws fixed unit-range variables once, and strength scales them, so a site keeps
its "direction" (brighter / darker, sharper / blurrier) as strength grows and
``strength=0`` is exactly the identity. At strength 1 the ranges are
gain 0.7..1.3, offset -0.1..0.1, gamma 0.67..1.49, noise_std 0..0.05, blur sigma 0..1 px.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedsec.errors import FedsecError

# Ranges at strength 1; chosen so that a 28x28 chest X-ray stays recognisable to a
# radiologist's eye but a model trained at one site loses accuracy at another.
MAX_GAIN = 0.3  # gain in 1 +/- MAX_GAIN
MAX_OFFSET = 0.1  # offset in +/- MAX_OFFSET
MAX_LOG_GAMMA = 0.4  # gamma in exp(+/- MAX_LOG_GAMMA)
MAX_NOISE_STD = 0.05
MAX_BLUR_SIGMA = 1.0  # pixels

_SHIFT_TAG = 0x5CA77E  # keeps these draws apart from the partitioner's streams


def _site_rng(site: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % 2**63, int(site) % 2**63, _SHIFT_TAG])


def _check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise FedsecError(f"shift strength {strength!r}; expected a number in [0, 1]")
    return float(strength)


def site_profile(site: int, strength: float, seed: int) -> dict:
    """The scanner parameters of hospital ``site``: a dict with ``site``, ``strength``,
    ``gain``, ``offset``, ``gamma``, ``noise_std``, ``blur_sigma`` and ``noise_seed``
    (plain Python numbers, for reports and ``rounds.jsonl``)."""
    strength = _check_strength(strength)
    rng = _site_rng(site, seed)
    # Always draw all variables, in a fixed order, whatever the strength: a site's scanner
    # must not change character when the strength is changed.
    u_gain, u_offset, u_gamma = rng.uniform(-1.0, 1.0, size=3)
    v_noise, v_blur = rng.uniform(0.0, 1.0, size=2)
    noise_seed = int(rng.integers(0, 2**62))
    return {
        "site": int(site),
        "strength": strength,
        "gain": 1.0 + MAX_GAIN * strength * float(u_gain),
        "offset": MAX_OFFSET * strength * float(u_offset),
        "gamma": math.exp(MAX_LOG_GAMMA * strength * float(u_gamma)),
        "noise_std": MAX_NOISE_STD * strength * float(v_noise),
        "blur_sigma": MAX_BLUR_SIGMA * strength * float(v_blur),
        "noise_seed": noise_seed,
    }


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``[N, C, H, W]``.

    MONAI's ``gaussian_1d`` + ``separable_filtering`` rather than ``GaussianSmooth``: the
    transform works on one channel-first image and pads with zeros, which darkens the
    border of a 28x28 image; ``separable_filtering(mode="replicate")`` takes the whole
    batch and keeps edge intensities.
    """
    from monai.networks.layers import separable_filtering
    from monai.networks.layers.convutils import gaussian_1d

    kernel = gaussian_1d(torch.tensor(sigma), truncated=3.0, normalize=True).to(x)
    return separable_filtering(x, [kernel, kernel], mode="replicate")


def apply_profile(x: torch.Tensor, profile: dict, stream: int = 0) -> torch.Tensor:
    """Apply a :func:`site_profile` (or any dict with its keys) to ``x`` float ``[N, C, H, W]``
    in [0, 1]; returns a new tensor of the same shape, clamped to [0, 1]. Deterministic:
    the noise comes from ``profile["noise_seed"]`` and ``stream`` (use different streams
    for different image sets of one site, e.g. 0 train, 1 test)."""
    if x.ndim != 4:
        raise FedsecError(f"acquisition shift expects images [N, C, H, W]; got shape {tuple(x.shape)}")
    y = x.to(torch.float32)
    if profile["blur_sigma"] > 0:
        y = _blur(y, profile["blur_sigma"])
    if profile["gamma"] != 1.0:
        y = y.clamp(0.0, 1.0).pow(profile["gamma"])  # a negative base has no real power
    y = y * profile["gain"] + profile["offset"]
    if profile["noise_std"] > 0:
        noise_seed = (int(profile["noise_seed"]) + 0x9E3779B97F4A7C15 * int(stream)) % 2**63
        gen = torch.Generator().manual_seed(noise_seed)
        noise = torch.randn(y.shape, generator=gen, dtype=torch.float32)
        y = y + profile["noise_std"] * noise.to(y.device)
    return y.clamp_(0.0, 1.0)


def apply_acquisition_shift(
    x: torch.Tensor, site: int, strength: float, seed: int, *, stream: int = 0
) -> torch.Tensor:
    """Image ``x`` float32 ``[N, C, H, W]`` in [0, 1] through hospital ``site``'s scanner.

    Returns a new ``[N, C, H, W]`` tensor in [0, 1]; ``strength=0`` returns an unchanged copy.
    The same (x, site, strength, seed, stream) always gives the same output; ``stream``
    only changes the noise draw (see :func:`apply_profile`).
    """
    strength = _check_strength(strength)
    if strength == 0.0:
        return x.clone()
    return apply_profile(x, site_profile(site, strength, seed), stream=stream)
