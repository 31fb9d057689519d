"""Position barcodes in the synthetic images and the tiny policy's reader of them (data/position_code.py,
policy/tiny.py): what makes the embedded default able to learn where the object is."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from data.position_code import AMPLITUDE, BARCODE_ROWS, FREQUENCIES, PATCH, barcode_basis, cell_codes, draw_barcodes
from data.synthetic import synthetic_row


def pixels(row) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"), dtype=np.float64)


def read_barcodes(image: np.ndarray) -> np.ndarray:
    """(patches_y, patches_x, 4K): the linear read-out Q^T (pixels - 128) / A of every patch."""
    q = barcode_basis(FREQUENCIES).reshape(-1, 4 * FREQUENCIES)
    n = image.shape[0] // PATCH
    out = np.zeros((n, n, 4 * FREQUENCIES))
    for r in range(n):
        for c in range(n):
            bar = image[r * PATCH:r * PATCH + BARCODE_ROWS, c * PATCH:(c + 1) * PATCH]
            out[r, c] = q.T @ (bar - 128.0).reshape(-1) / AMPLITUDE
    return out


def test_basis_is_orthonormal_and_blind_to_brightness():
    q = barcode_basis(FREQUENCIES).reshape(-1, 4 * FREQUENCIES)
    assert np.allclose(q.T @ q, np.eye(4 * FREQUENCIES), atol=1e-9)
    for channel in range(3):
        flat = np.zeros((BARCODE_ROWS, PATCH, 3))
        flat[:, :, channel] = 1.0
        assert np.abs(q.T @ flat.reshape(-1)).max() < 1e-9


def test_every_patch_reads_back_its_cell_code_after_png_rounding():
    image = pixels(synthetic_row(5, 112, 0, barcodes="all"))
    read, codes = read_barcodes(image), cell_codes(112, FREQUENCIES)
    expected = np.repeat(np.repeat(codes, 2, axis=0), 2, axis=1)  # 4 patches per 28-px cell
    assert np.abs(read - expected).max() < 0.05
    # and different cells are told apart: each patch is nearest to its own cell's code
    flat = codes.reshape(-1, codes.shape[-1])
    nearest = np.argmin(((read.reshape(-1, 1, flat.shape[1]) - flat[None]) ** 2).sum(-1), axis=1).reshape(8, 8)
    assert (nearest == np.arange(16).reshape(4, 4).repeat(2, 0).repeat(2, 1)).all()


def test_object_barcodes_mark_only_the_patches_of_shapes_and_leave_the_labels_alone():
    plain, tagged = synthetic_row(7, 112, 3), synthetic_row(7, 112, 3, barcodes="objects")
    assert (plain["bbox"], plain["points"], plain["mask"], plain["problem"]) == \
        (tagged["bbox"], tagged["points"], tagged["mask"], tagged["problem"])
    image = pixels(tagged)
    read = np.linalg.norm(read_barcodes(image), axis=-1)
    from data.masks import decode_rle

    has_shape = np.zeros((8, 8), bool)
    scene = np.abs(pixels(plain) - pixels(plain)[0, 0]).sum(-1) > 60  # every shape, not only the target
    for r in range(8):
        for c in range(8):
            has_shape[r, c] = scene[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH].any()
    assert decode_rle(plain["mask"]).any()
    assert (read[has_shape] > 3).all() and (read[~has_shape] < 1).all()


def test_barcodes_refuse_a_size_that_is_not_whole_cells():
    with pytest.raises(ValueError, match="multiple of 28"):
        draw_barcodes(np.zeros((100, 100, 3)), FREQUENCIES)


def test_tiny_policy_reads_positions_and_attends_to_the_image(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from policy.prompt import chat_prompt
    from policy.tiny import build_tiny_policy

    path = build_tiny_policy(tmp_path / "p", vision_hidden_size=128, number_code=True, position_reader=True)
    proc = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    row = synthetic_row(3, 112, 0, barcodes="all")
    image = Image.open(io.BytesIO(row["image"])).convert("RGB")
    enc = proc(text=[chat_prompt(row["problem"])], images=[image], return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(enc.pixel_values, enc.image_grid_thw)
        feats = torch.cat(list(getattr(feats, "pooler_output", feats)))
        out = model(**enc, output_attentions=True)
    n = 4 * FREQUENCIES
    codes = torch.tensor(cell_codes(112, FREQUENCIES), dtype=torch.float32).reshape(-1, n)
    cos = torch.nn.functional.cosine_similarity(feats[:, :n], codes, dim=-1)
    assert cos.min() > 0.99  # image token i carries the code of its own cell, in row-major order
    is_image = enc.input_ids[0] == model.config.image_token_id
    attention = out.attentions[0][0, 0, -1]  # layer 0, head 0, from the last prompt position
    assert attention[is_image].sum() > 0.9
