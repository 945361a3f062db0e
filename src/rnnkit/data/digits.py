"""scikit-learn's 8x8 handwritten digits, read row by row as sequences."""

from __future__ import annotations

import numpy as np

from rnnkit.data.builtin import builtin_file

DIGIT_ROWS = 8
DIGIT_COLUMNS = 8
DIGIT_MAX_PIXEL = 16.0


def load_digit_sequences() -> tuple[np.ndarray, np.ndarray]:
    """Embedded digits -> X (1797, 8, 8) float32 in [0, 1] (8 steps of 8 pixels), y (1797,) int64."""
    table = np.loadtxt(builtin_file("digits.csv.gz"), delimiter=",", dtype=np.float32)
    pixels, labels = table[:, :-1], table[:, -1]
    images = pixels.reshape(-1, DIGIT_ROWS, DIGIT_COLUMNS) / DIGIT_MAX_PIXEL
    return np.ascontiguousarray(images, dtype=np.float32), labels.astype(np.int64)
