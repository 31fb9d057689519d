"""Position barcodes: where each image patch is, written into the synthetic images for the tiny policy.

Why: Qwen2.5-VL's vision tower has only relative (rotary) positions, and rotary positions never reach an
attention's values, so a token cannot *read* where it is. A pretrained tower learns absolute position
from real images; the tiny random one cannot in a few hundred steps (docs/learnability.md). So every
14-px patch of a synthetic image starts with ``BARCODE_ROWS`` rows of pixels that spell out the
position of its 28-px merged cell (the cell one image token covers), and the tiny policy's vision
tower is initialised to read them (``policy.tiny.init_position_reader``). The barcodes are written over
the shapes (``data.synthetic_barcodes=objects``: only the patches that hold a shape pixel; ``all``: every
patch), so 2 of every 14 pixel rows of a shape (~12% of its pixels) carry its position instead of its
colour, like stripes; masks, boxes and points stay those of the whole shape (what an annotator outlines),
so the rewards and the reference answers do not depend on the barcodes.

The code of a cell centred at (cx, cy) px is f = [fourier(cx), fourier(cy)], 4K numbers, with
fourier(n) = [cos(w_k n), sin(w_k n)]_k, K frequencies, periods geometric from 6 px to 4 * image_size:
the same code as the tiny policy's number tokens (``policy.tiny.number_code_rows``), so writing a
coordinate is a copy plus a rotation (a shift), both linear. The barcode of a patch is
    pixels = 128 + AMPLITUDE * Q f     (clipped to 0..255, rounded),
where Q (BARCODE_ROWS * 14 * 3 values x 4K) has orthonormal columns orthogonal to each channel's
constant, so a linear read-out Q^T (pixels - 128) / AMPLITUDE gives f back exactly up to rounding.
"""
from __future__ import annotations

import numpy as np

PATCH = 14  # Qwen2.5-VL patch side (px)
CELL = 28  # merged 2x2 patches = one image token
BARCODE_ROWS = 2  # pixel rows at the top of every patch
AMPLITUDE = 40.0
FREQUENCIES = 16  # K: 4K = 64 code values per patch, the first 64 dims of the tiny vision tower


def fourier_code(values, k: int, image_size: int) -> np.ndarray:
    """[cos(w_j v), sin(w_j v)]_j for each value, K = k frequencies, periods geometric 6 px .. 4 * image_size."""
    periods = np.geomspace(6.0, 4.0 * image_size, k)
    angles = np.asarray(values, dtype=np.float64)[..., None] * (2 * np.pi / periods)
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=-1)


def barcode_basis(k: int) -> np.ndarray:
    """Q: (BARCODE_ROWS, PATCH, 3, 4k) orthonormal columns (over the barcode's pixels), each orthogonal to
    the three per-channel constants, so neither a brightness change nor the processor's mean subtraction
    reaches the read-out. Deterministic (fixed seed): the images and the policy must agree on it."""
    n = BARCODE_ROWS * PATCH * 3
    if 4 * k + 3 > n:
        raise ValueError(f"a {BARCODE_ROWS}-row barcode holds at most {(n - 3) // 4} frequencies, asked for {k}")
    channel = np.zeros((BARCODE_ROWS, PATCH, 3, 3))
    for c in range(3):
        channel[:, :, c, c] = 1.0
    noise = np.random.default_rng(20250306).standard_normal((BARCODE_ROWS, PATCH, 3, 4 * k))
    q, _ = np.linalg.qr(np.concatenate([channel, noise], axis=-1).reshape(n, 4 * k + 3))
    return q[:, 3:].reshape(BARCODE_ROWS, PATCH, 3, 4 * k)


def cell_codes(image_size: int, k: int) -> np.ndarray:
    """(cells, cells, 4k): the code of each merged cell's centre, indexed [row, col]."""
    centres = (np.arange(image_size // CELL) + 0.5) * CELL
    x = fourier_code(centres, k, image_size)  # (cells, 2k)
    cells = len(centres)
    return np.concatenate([np.broadcast_to(x[None, :, :], (cells, cells, 2 * k)),
                           np.broadcast_to(x[:, None, :], (cells, cells, 2 * k))], axis=-1)


def draw_barcodes(image: np.ndarray, k: int, where: np.ndarray | None = None) -> np.ndarray:
    """Writes the barcodes into ``image`` (H, W, 3 float, H = W a multiple of 28), in place: into every
    patch, or with ``where`` (H, W bool) only into the patches that hold a pixel of it."""
    size = image.shape[0]
    if image.shape[:2] != (size, size) or size % CELL:
        raise ValueError(f"barcodes need a square image with a side that is a multiple of {CELL}, got {image.shape}")
    q, codes = barcode_basis(k), cell_codes(size, k)
    for row in range(size // PATCH):
        for col in range(size // PATCH):
            bar = 128.0 + AMPLITUDE * q @ codes[row // 2, col // 2]
            y, x = row * PATCH, col * PATCH
            if where is not None and not where[y:y + PATCH, x:x + PATCH].any():
                continue
            image[y:y + BARCODE_ROWS, x:x + PATCH] = bar
    return image
