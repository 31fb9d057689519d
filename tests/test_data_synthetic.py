import io
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.masks import bbox_from_mask, decode_rle
from data.position_code import BARCODE_ROWS, PATCH
from data.synthetic import COLOURS, matching_shapes, reference_answer, synthetic_row, write_synthetic


def test_same_seed_same_bytes(tmp_path):
    a = write_synthetic(tmp_path / "a.parquet", 12, seed=3)
    b = write_synthetic(tmp_path / "b.parquet", 12, seed=3)
    c = write_synthetic(tmp_path / "c.parquet", 12, seed=4)
    assert a.read_bytes() == b.read_bytes()
    ta, tc = pq.read_table(a), pq.read_table(c)
    assert ta.column("image").to_pylist() != tc.column("image").to_pylist()
    # row i depends only on (seed, i): a longer set extends a shorter one
    assert synthetic_row(5, seed=3)["image"] == ta.column("image")[5].as_py()


def test_schema_columns(tmp_path):
    t = pq.read_table(write_synthetic(tmp_path / "s.parquet", 3, image_size=56))
    assert {"id", "image", "height", "width", "problem", "mask", "bbox", "points", "source"} <= set(t.column_names)
    row = t.to_pylist()[0]
    assert row["source"] == "synthetic" and row["height"] == row["width"] == 56
    assert Image.open(io.BytesIO(row["image"])).size == (56, 56)


@pytest.mark.parametrize("barcodes", ["off", "objects", "all"])
def test_each_row_mask_matches_query_target(barcodes):
    """The mask is the target shape as drawn. With barcodes on, the top BARCODE_ROWS pixel rows of every
    14-px patch that holds a shape pixel ("objects"; every patch: "all") carry the patch's position instead
    of colour, shapes included (data/position_code.py): every other pixel of the mask is the target's colour,
    and no pixel outside it is, barcode rows aside."""
    barcode_row = (np.arange(112) % PATCH < BARCODE_ROWS)[:, None].repeat(112, axis=1)
    for i in range(60):
        r = synthetic_row(i, image_size=112, seed=1, barcodes=barcodes)
        mask = decode_rle(r["mask"])
        assert mask.shape == (112, 112) and mask.any()
        assert r["bbox"] == bbox_from_mask(mask)
        for x, y in r["points"]:
            assert mask[y, x]
        pixels = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"))
        colour, shape = r["reasoning"].split()
        coloured = (pixels == COLOURS[colour]).all(axis=-1)
        drawn = mask & ~barcode_row if barcodes != "off" else mask
        assert coloured[drawn].all()                            # the mask covers exactly the target's colour
        if barcodes != "off":                                   # ... up to the barcode rows, which it keeps
            assert not coloured[mask & barcode_row].all()
        if r["kind"] in ("colour", "colour_shape"):
            assert colour in r["problem"]
        if r["kind"] == "colour":                               # a unique colour: no other pixel has it
            assert coloured.sum() == drawn.sum()
        if r["kind"] in ("shape", "colour_shape"):
            assert shape in r["problem"]


def test_grid_alignment_without_jitter():
    for i in range(20):
        r = synthetic_row(i, image_size=112, seed=2, jitter=0)
        x1, _, x2, _ = r["bbox"]
        assert ((x1 + x2) / 2 - 14) % 28 == 0  # every shape is centred on a 28-px cell centre
    moved = [synthetic_row(i, image_size=112, seed=2, jitter=3)["bbox"] for i in range(20)]
    assert any(((b[0] + b[2]) / 2 - 14) % 28 for b in moved)


def _shape(colour, shape, row, col, area=100):
    return {"colour": colour, "shape": shape, "row": row, "col": col, "area": area}


def test_matching_shapes_hand_made_scene():
    scene = [_shape("red", "circle", 0, 0, 300), _shape("red", "square", 0, 2, 100),
             _shape("blue", "circle", 2, 1, 110)]
    assert matching_shapes({"kind": "colour", "colour": "red"}, scene) == [0, 1]            # ambiguous
    assert matching_shapes({"kind": "colour", "colour": "blue"}, scene) == [2]
    assert matching_shapes({"kind": "shape", "shape": "circle"}, scene) == [0, 2]
    assert matching_shapes({"kind": "relation", "direction": "left of", "colour": "red", "shape": "square"},
                           scene) == [0, 2]
    assert matching_shapes({"kind": "relation", "direction": "right of", "colour": "blue", "shape": "circle"},
                           scene) == [1]
    assert matching_shapes({"kind": "relation", "direction": "below", "colour": "red", "shape": "circle"}, scene) == [2]
    assert matching_shapes({"kind": "extreme", "which": "topmost"}, scene) == [0, 1]
    assert matching_shapes({"kind": "extreme", "which": "bottommost"}, scene) == [2]
    assert matching_shapes({"kind": "size", "which": "largest"}, scene) == [0]
    assert matching_shapes({"kind": "size", "which": "smallest"}, scene) == [1, 2]           # 110 < 1.2 * 100


def test_reference_answer_format():
    text = reference_answer("the red circle", [1, 2, 30, 40], [[10, 20], [12, 22]], reasoning="red circle")
    m = re.fullmatch(r"<think>(.*?)</think><answer>(.*?)</answer>", text)
    assert m and m.group(1) == "red circle"
    assert json.loads(m.group(2)) == {"bbox": [1, 2, 30, 40], "points_1": [10, 20], "points_2": [12, 22]}
    assert reference_answer("The Cat.", [0, 0, 1, 1], [[0, 0], [1, 1]]).startswith("<think>the cat</think>")


def test_multi_object_rows_name_every_target(tmp_path):
    """'all the red shapes' names every red shape: one object (box, point) and one mask per target; the
    rule set's solution and reference answer list them all, and the reference answer earns full marks."""
    import json

    from data.dataset import ParquetSource
    from data.masks import decode_rle
    from reward import rule_rewards

    path = write_synthetic(tmp_path / "m.parquet", 40, 112, seed=2, multi_object=True, barcodes="objects",
                           kinds=("colour", "all_colour"), num_shapes=(1, 3))
    samples = list(ParquetSource(path, shuffle=False).iter_epoch())
    assert len(samples) == 40
    several = [s for s in samples if len(s.objects) > 1]
    assert several and all(s.problem.startswith("all the ") for s in several)
    for s in samples:
        union = decode_rle(s.mask_rle)
        assert len(s.mask_rle) == len(s.objects)
        for rle, obj in zip(s.mask_rle, s.objects):
            mask = decode_rle(rle)
            ys, xs = mask.nonzero()
            assert (obj["bbox_2d"] == [xs.min(), ys.min(), xs.max(), ys.max()]
                    and mask[obj["point_2d"][1], obj["point_2d"][0]])
            assert (union | mask).sum() == union.sum()
        solution = s.solution(112, "multi_object")
        assert len(json.loads(solution)) == len(s.objects)
        terms = rule_rewards("multi_object", s.reference_answer(112, "multi_object"), solution)
        assert terms == {"think_format": 1.0, "answer_format": 2.0, "accuracy": 3.0, "non_repeat": 1.0}


def test_multi_object_kinds_need_multi_object_rows():
    with pytest.raises(ValueError, match="multi_object=True"):
        synthetic_row(0, kinds=("all_colour",))
