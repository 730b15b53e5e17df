"""One augmentation spec for every backend.

`AugConfig` says *what* to draw per sample; `pipeline.augment.params` draws it, and
`pipeline.augment.uint8_ops` (CPU workers), `pipeline.augment.batch_ops` (GPU batches) and
`pipeline.data.dali_graph` (DALI ops) say *how*. Every random parameter is drawn per sample, never once
per batch.

Two ways to bring an image to ``image_size`` (``preprocess``):

* ``resize``: the whole image, resized (antialiased) to a square; flips, rotation, shear and scale are
  then one affine warp per sample. The original project's recipe.
* ``crop``: native resolution kept. Training takes a random ``image_size`` crop (offsets even, so the
  2x2 grid of an up-sampling trace stays aligned), optionally after a random down-scaling of the
  whole image (``downscale_prob``: factor from ``downscale``, one of four interpolations, both
  classes alike: resampling must not be the class); evaluation takes the centre crop. Images
  smaller than the crop are padded (reflect), never up-sampled. No resampling at all when no
  down-scaling, rotation, shear or zoom is drawn.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import math
from typing import Any, Tuple

# The default normalisation after augmentation (ImageNet statistics, RGB, on 0..1): DeepfakeNet's.
MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)

STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)

# ``(mean, std)`` per RGB channel on 0..1: every loader and scoring path computes ``(x / 255 - mean) / std``.
# A checkpoint records the one it was trained with (a pretrained backbone brings its own, e.g. 0.5/0.5).
Norm = Tuple[Tuple[float, float, float], Tuple[float, float, float]]
DEFAULT_NORM: Norm = (MEAN, STD)

PRESETS = ("none", "seed", "robust", "artifact")
PREPROCESS = ("resize", "crop")


def check_norm(norm: Any, what: str = "norm") -> Norm:
    """``norm`` as a `Norm` of floats; ValueError naming ``what`` unless it is two triples of finite
    numbers with every std > 0."""
    ok = isinstance(norm, (list, tuple)) and len(norm) == 2 and all(
        isinstance(v, (list, tuple)) and len(v) == 3
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        for v in norm)
    if not ok or not all(x > 0 for x in norm[1]):
        raise ValueError(f"{what} {norm!r}: expected (mean, std), each 3 finite numbers, every std > 0")
    return tuple(float(x) for x in norm[0]), tuple(float(x) for x in norm[1])  # type: ignore[return-value]


def _check_range(name: str, rng: Tuple[float, float], lo: float, hi: float) -> None:
    if len(rng) != 2 or not (lo <= rng[0] <= rng[1] <= hi):
        raise ValueError(f"AugConfig.{name}={rng!r}: expected (low, high) with {lo} <= low <= high <= {hi}")


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"AugConfig.{name}={p!r}: expected a probability in [0, 1]")


SBI_MASKS = ("face", "ellipse")


@dataclass(frozen=True)
class AugConfig:
    """Per-sample augmentation parameters, shared by the DALI and torchvision backends.

    Attributes:
        apply_prob: probability that the geometric + brightness block is applied to a sample at
            all (the original project augmented half its items: 0.5 in the ``seed`` preset).
        hflip: probability of a horizontal flip.
        vflip: probability of a vertical flip.
        rotate: rotation angle in degrees, drawn uniformly from ``[-rotate, rotate]``.
        shear_x: shear angle along x in degrees, drawn uniformly from the range
            (torchvision ``RandomAffine(shear=(x0, x1, y0, y1))`` semantics).
        shear_y: shear angle along y in degrees, drawn uniformly from the range.
        scale: isotropic zoom factor, drawn uniformly from the range (1.0 = none).
        brightness: multiplicative brightness factor, drawn uniformly from the range.
        blur_prob: probability of a Gaussian blur (CNNDetection-style robustness).
        blur_sigma: blur sigma in pixels of the output image, drawn uniformly from the range.
        jpeg_prob: probability of JPEG re-compression.
        jpeg_quality: JPEG quality, drawn uniformly (integer) from the range.
        preprocess: ``resize`` or ``crop`` (see the module docstring).
        downscale_prob: probability of down-scaling the whole image first (``crop`` only).
        downscale: the down-scaling factor, drawn uniformly from the range (1.0 = none).
        self_blend: probability that a *real* training sample is replaced by a self-blended
            pseudo-fake of itself and labelled fake (`pipeline.augment.self_blend`); fakes never are.
        sbi_mask: ``face``: the blend mask follows the face stage's detector box where the sample has one
            (`pipeline.augment.face_mask`), else the default ellipse; ``ellipse``: always the ellipse.
    """

    apply_prob: float = 1.0
    hflip: float = 0.0
    vflip: float = 0.0
    rotate: float = 0.0
    shear_x: Tuple[float, float] = (0.0, 0.0)
    shear_y: Tuple[float, float] = (0.0, 0.0)
    scale: Tuple[float, float] = (1.0, 1.0)
    brightness: Tuple[float, float] = (1.0, 1.0)
    blur_prob: float = 0.0
    blur_sigma: Tuple[float, float] = (0.1, 3.0)
    jpeg_prob: float = 0.0
    jpeg_quality: Tuple[int, int] = (30, 100)
    preprocess: str = "resize"
    downscale_prob: float = 0.0
    downscale: Tuple[float, float] = (0.5, 1.0)
    self_blend: float = 0.0
    sbi_mask: str = "face"

    def __post_init__(self) -> None:
        if self.sbi_mask not in SBI_MASKS:
            raise ValueError(f"--sbi-mask {self.sbi_mask!r}: choose one of {', '.join(SBI_MASKS)}")
        if self.preprocess not in PREPROCESS:
            raise ValueError(f"--preprocess {self.preprocess!r}: choose one of {', '.join(PREPROCESS)}")
        if self.downscale_prob > 0 and self.preprocess != "crop":
            raise ValueError("AugConfig.downscale_prob needs preprocess='crop' (a resize already resamples)")
        _check_range("downscale", self.downscale, 0.1, 1.0)
        for name in ("apply_prob", "hflip", "vflip", "blur_prob", "jpeg_prob", "downscale_prob", "self_blend"):
            _check_prob(name, getattr(self, name))
        if not 0.0 <= self.rotate <= 180.0:
            raise ValueError(f"AugConfig.rotate={self.rotate!r}: expected degrees in [0, 180]")
        _check_range("shear_x", self.shear_x, -45.0, 45.0)
        _check_range("shear_y", self.shear_y, -45.0, 45.0)
        _check_range("scale", self.scale, 0.1, 10.0)
        _check_range("brightness", self.brightness, 0.0, 10.0)
        _check_range("blur_sigma", self.blur_sigma, 0.0, 20.0)
        _check_range("jpeg_quality", self.jpeg_quality, 1, 100)

    @property
    def is_identity(self) -> bool:
        """True when the config does nothing but bring images to size (the eval path)."""
        return self == AugConfig.preset("none", preprocess=self.preprocess)

    def for_eval(self) -> "AugConfig":
        """The evaluation config that goes with this training config: same ``preprocess``, nothing random."""
        return AugConfig.preset("none", preprocess=self.preprocess)

    @property
    def geometric(self) -> bool:
        """True when the affine warp differs from a plain resize for some samples."""
        return self.apply_prob > 0 and (
            self.hflip > 0 or self.vflip > 0 or self.rotate > 0
            or self.shear_x != (0.0, 0.0) or self.shear_y != (0.0, 0.0) or self.scale != (1.0, 1.0)
        )

    @classmethod
    def preset(cls, name: str, **overrides) -> "AugConfig":
        """Build a named preset, with any field overridden by keyword.

        ``none``: resize only (evaluation). ``seed``: the original project's recipe: horizontal and
        vertical flips, rotation +-30 deg, shear 0.75-1.25 deg on both axes, brightness 0.75-1.25,
        applied to half the samples. ``robust``: ``seed`` plus Gaussian blur (p=0.5, sigma 0.1-3)
        and JPEG re-compression (p=0.5, quality 30-100), as in CNNDetection (Wang et al. 2020).
        ``artifact``: native-resolution crops (``preprocess='crop'``), horizontal flips, random
        down-scaling of half the images of both classes (factor 0.5-1, random interpolation), blur
        and JPEG re-compression at CNNDetection's p=0.1; no rotation or shear (they resample every
        pixel) and no brightness change.
        """
        if name == "none":
            base = cls()
        elif name in ("seed", "robust"):
            base = cls(
                apply_prob=0.5, hflip=0.5, vflip=0.5, rotate=30.0,
                shear_x=(0.75, 1.25), shear_y=(0.75, 1.25), brightness=(0.75, 1.25),
            )
            if name == "robust":
                base = dataclasses.replace(base, blur_prob=0.5, jpeg_prob=0.5)
        elif name == "artifact":
            base = cls(preprocess="crop", hflip=0.5, downscale_prob=0.5, downscale=(0.5, 1.0),
                       blur_prob=0.1, blur_sigma=(0.1, 3.0), jpeg_prob=0.1, jpeg_quality=(30, 100))
        else:
            raise ValueError(f"unknown augmentation preset {name!r}: choose one of {', '.join(PRESETS)}")
        return dataclasses.replace(base, **overrides) if overrides else base
