"""THE preprocessing definition: the training pipeline normalises every split with :func:`apply_normalisation`,
and the bundle's predictor (``targets.bundle``) normalises a service's inputs with the same function, so a model
is fed exactly the floats it was trained and checked on. numpy only: a serving process needs no torch.
"""

from __future__ import annotations

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
