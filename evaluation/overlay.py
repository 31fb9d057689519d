"""Pictures for people: the image with the predicted box, points and mask over the ground truth,
captioned with the query and the model's reasoning. Written as PNG; evaluation logs a handful to MLflow.

Colours: ground-truth mask green, predicted mask red (overlap looks yellow-brown), predicted box and
points yellow. The caption panel below the image holds the query, the reasoning (wrapped, truncated)
and the sample's IoU.
"""
from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GT_COLOUR = np.array([0, 200, 0], dtype=np.float32)
PRED_COLOUR = np.array([230, 30, 30], dtype=np.float32)
BOX_COLOUR = (255, 220, 0)
ALPHA = 0.45


def overlay(image: Image.Image, pred_mask: np.ndarray | None = None, gt_mask: np.ndarray | None = None,
            box: list[float] | None = None, points: list[list[float]] | None = None) -> Image.Image:
    """The image (same size) with masks blended in and the box and points drawn on top."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    for mask, colour in ((gt_mask, GT_COLOUR), (pred_mask, PRED_COLOUR)):
        if mask is not None:
            m = np.asarray(mask, dtype=bool)
            pixels[m] = (1 - ALPHA) * pixels[m] + ALPHA * colour
    out = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    width = max(1, round(max(out.size) / 200))
    if box is not None:  # a model may answer x2 < x1: draw the box it spans rather than fail
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=BOX_COLOUR, width=width)
    for x, y in points or []:
        r = 2 * width + 1
        draw.ellipse([x - r, y - r, x + r, y + r], outline=(0, 0, 0), fill=BOX_COLOUR)
    return out


def captioned(picture: Image.Image, query: str, reasoning: str = "", iou: float | None = None,
              max_lines: int = 8) -> Image.Image:
    """``picture`` with a white caption panel underneath (query, reasoning, IoU)."""
    font = ImageFont.load_default()
    chars = max(20, picture.width // 7)
    lines = textwrap.wrap(f"query: {query}", chars)
    if iou is not None:
        lines.append(f"IoU: {iou:.3f}")
    lines += textwrap.wrap(f"reasoning: {reasoning}", chars)[:max_lines] if reasoning else []
    line_h = 12
    canvas = Image.new("RGB", (picture.width, picture.height + line_h * len(lines) + 8), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, picture.height + 4 + i * line_h), line, fill=(0, 0, 0), font=font)
    return canvas


def save_overlay(path, image: Image.Image, *, query: str, reasoning: str = "", pred_mask=None, gt_mask=None,
                 box=None, points=None, iou: float | None = None, min_width: int = 320) -> Image.Image:
    """Overlay + caption written to ``path`` (PNG). Small images are upscaled (nearest) to min_width so
    the caption stays readable; masks, box and points are scaled with them."""
    scale = max(1, -(-min_width // image.width))
    if scale > 1:
        big = lambda m: None if m is None else np.kron(np.asarray(m, bool), np.ones((scale, scale), bool))  # noqa: E731
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        pred_mask, gt_mask = big(pred_mask), big(gt_mask)
        box = None if box is None else [v * scale for v in box]
        points = None if points is None else [[x * scale, y * scale] for x, y in points]
    picture = captioned(overlay(image, pred_mask, gt_mask, box, points), query, reasoning, iou)
    picture.save(path, format="PNG")
    return picture
