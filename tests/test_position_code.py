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


def test_colour_templates_tell_every_palette_colour_from_the_others_and_from_grey():
    from data.synthetic import COLOURS
    from policy.tiny import chroma, colour_templates

    assert np.abs(chroma((213, 213, 213))).max() < 1e-12
    for colour, w in colour_templates().items():
        own = w @ chroma(COLOURS[colour])
        assert own > 0.1, colour
        assert all(own - w @ chroma(rgb) > 0.1 for other, rgb in COLOURS.items() if other != colour), colour


def test_tiny_policy_reads_positions_and_colours_and_attends_to_the_named_shape(tmp_path):
    """The grounding circuit at initialisation (policy.tiny): image tokens carry their cell's code and
    colour, layer 0 head 0 gathers the query's colour word, layer 1 head 0 attends to the image token of
    the shape of that colour."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from data.synthetic import COLOURS
    from policy.prompt import chat_prompt
    from policy.tiny import CHROMA, build_tiny_policy, chroma

    path = build_tiny_policy(tmp_path / "p", vision_hidden_size=128, number_code=True, position_reader=True)
    proc = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    n = 4 * FREQUENCIES
    colour_words = {proc.tokenizer.convert_tokens_to_ids(w) for c in COLOURS for w in (c, " " + c)}

    def forward(row):
        image = Image.open(io.BytesIO(row["image"])).convert("RGB")
        enc = proc(text=[chat_prompt(row["problem"])], images=[image], return_tensors="pt")
        with torch.no_grad():
            feats = model.model.get_image_features(enc.pixel_values, enc.image_grid_thw)
            out = model(**enc, output_attentions=True)
        return enc.input_ids[0], torch.cat(list(getattr(feats, "pooler_output", feats))), out.attentions

    _, feats, _ = forward(synthetic_row(3, 112, 0, barcodes="all"))
    codes = torch.tensor(cell_codes(112, FREQUENCIES), dtype=torch.float32).reshape(-1, n)
    assert torch.nn.functional.cosine_similarity(feats[:, :n], codes, dim=-1).min() > 0.99  # row-major cells

    for index in range(12):  # two shapes of different colours, the query names one colour
        row = synthetic_row(index, 112, 0, barcodes="objects", kinds=("colour",), num_shapes=(2, 2))
        ids, feats, attentions = forward(row)
        x1, y1, x2, y2 = row["bbox"]
        target = int((y1 + y2) / 2 // 28) * 4 + int((x1 + x2) / 2 // 28)
        colour = row["problem"].split()[1]
        seen = feats[:, n + CHROMA:n + CHROMA + 2]
        assert torch.nn.functional.cosine_similarity(seen[target],
                                                     torch.tensor(chroma(COLOURS[colour]), dtype=torch.float32),
                                                     dim=0) > 0.99
        gather = attentions[0][0, 0, -1]  # layer 0, head 0, from the last prompt position
        assert gather[torch.tensor([int(t) in colour_words for t in ids])].sum() > 0.9
        retrieve = attentions[1][0, 0, -1][ids == model.config.image_token_id]
        assert retrieve.sum() > 0.9 and retrieve[target] > 0.5 * retrieve.sum(), (index, row["problem"])
