"""THE preprocessing definition: the training pipeline normalises every split with :func:`apply_normalisation`,
and the bundle's predictor (``targets.bundle``) normalises a service's inputs with the same function, so a model
is fed exactly the floats it was trained and checked on. An image file becomes an input through
:func:`load_image` (decode, resize, crop, pixel / 255), again the same function for training and serving.
numpy only (Pillow for image files): a serving process needs no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.core.errors import CompressorError


def apply_normalisation(x: np.ndarray, normalisation: dict | None) -> np.ndarray:
    """The preprocessing of every model input: (N, C_in, ...) raw values -> (N, C_in, ...) float32.

    With ``normalisation=None`` the input is only converted to float32. With
    ``{"mean": [m_0, ..., m_{C_in-1}], "std": [s_0, ...]}`` (one value per input channel, or one for all)::

        out[n, c, ...] = (float32(x[n, c, ...]) - float32(m_c)) / float32(s_c)

    computed in float32 (numpy broadcasts mean/std shaped (1, C_in, 1, ...) along axis 1), so the result is
    the same bytes wherever it runs.
    """
    x = np.asarray(x)
    if x.dtype.kind not in "fiub":
        raise CompressorError(f"expected a numeric input array, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if normalisation is None:
        return x
    if x.ndim < 2:
        raise CompressorError(f"normalisation needs an (N, C_in, ...) batch, got shape {x.shape}")
    broadcast = (1, -1) + (1,) * (x.ndim - 2)  # (1, C_in, 1, ...): one value per channel on axis 1
    mean = np.asarray(normalisation["mean"], dtype=np.float32).reshape(broadcast)
    std = np.asarray(normalisation["std"], dtype=np.float32).reshape(broadcast)
    for name, values in (("mean", mean), ("std", std)):
        if values.shape[1] not in (1, x.shape[1]):
            raise CompressorError(f"normalisation has {values.shape[1]} {name} values for an input with "
                                  f"{x.shape[1]} channels (shape {x.shape}); give one per channel")
    if not np.all(std > 0):
        raise CompressorError(f"normalisation std {std.reshape(-1).tolist()} must be positive")
    return (x - mean) / std


@dataclass(frozen=True)
class ImageSpec:
    """How an image file becomes a model input (C, H, W): ``channels`` 1 (grayscale) or 3 (RGB); the shorter side
    resized to ``resize`` pixels (bilinear) when given; then a centred ``crop`` × ``crop`` square when given."""

    channels: int = 3
    resize: int | None = None
    crop: int | None = None

    def describe(self) -> dict:
        """JSON-safe form for the report, the bundle's metadata and the data cache's key."""
        return {"channels": self.channels, "resize": self.resize, "crop": self.crop,
                "decoder": "Pillow", "interpolation": "bilinear", "scale": "pixel / 255"}

    def output_shape(self, example: Path) -> tuple[int, int, int]:
        """(C, H, W) of every decoded image, read from one file (all must match it)."""
        return tuple(load_image(example, self, dtype=np.uint8).shape)  # type: ignore[return-value]


def load_image(path: str | Path, spec: ImageSpec, dtype=np.float32) -> np.ndarray:
    """Decode one image file as the model sees it: (C, H, W), uint8 pixels, or float32 pixel / 255 in [0, 1] (what a
    teacher trained with torchvision's ``ToTensor`` expects; mean/std normalisation follows in
    :func:`apply_normalisation`). Needs Pillow."""
    try:
        from PIL import Image  # only image inputs need Pillow; a serving process for arrays does not
    except ImportError as exc:
        raise CompressorError("reading image files needs Pillow (pip install pillow)") from exc
    with Image.open(path) as image:
        return image_array(image, spec, dtype, str(path))


def image_array(image, spec: ImageSpec, dtype=np.float32, name: str = "an image") -> np.ndarray:
    """A decoded PIL image as the model sees it, as :func:`load_image` says: convert to ``spec.channels``, resize the
    shorter side, centre-crop, then (C, H, W) uint8 or float32 pixel / 255."""
    from PIL import Image

    image = image.convert("L" if spec.channels == 1 else "RGB")
    if spec.resize is not None:
        width, height = image.size
        scale = spec.resize / min(width, height)
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR)
    if spec.crop is not None:
        width, height = image.size
        if spec.crop > min(width, height):
            raise CompressorError(f"{name}: a {spec.crop}-pixel crop does not fit its {width}×{height} pixels; pass "
                                  f"--resize at least {spec.crop}")
        left, top = (width - spec.crop) // 2, (height - spec.crop) // 2
        image = image.crop((left, top, left + spec.crop, top + spec.crop))
    pixels = np.asarray(image, dtype=np.uint8)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (C, H, W)
    # pixel × float32(1/255), the very operation the training side applies to the cached uint8 rows
    return pixels if dtype == np.uint8 else pixels.astype(np.float32) * np.float32(1 / 255)
