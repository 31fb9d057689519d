import io
import json
import logging
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.dataset import ParquetSource, Sample, iter_samples
from data.masks import encode_rle
from data.schema import write_rows
from data.synthetic import synthetic_row, write_synthetic


def png(w=8, h=6, colour=(10, 20, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def png_declaring(w, h):
    """A tiny PNG whose header claims w x h pixels (decompression-bomb shaped)."""
    data = bytearray(png(1, 1))
    ihdr = struct.pack(">II", w, h) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def good_row(i, w=8, h=6):
    mask = np.zeros((h, w), bool)
    mask[1:4, 2:6] = True
    return {"id": f"r{i}", "image": png(w, h), "height": h, "width": w, "problem": f"thing {i}",
            "mask": encode_rle(mask), "bbox": [2, 1, 5, 3], "points": [[3, 2], [5, 2]], "source": "test"}


def ids(batch):
    return [s.id for s in batch]


@pytest.fixture(scope="module")
def synthetic_file(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("syn") / "train.parquet", 40, image_size=56, seed=0)


def test_epochs_are_seeded_permutations(synthetic_file):
    a = ParquetSource(synthetic_file, seed=7, chunk_rows=8)
    b = ParquetSource(synthetic_file, seed=7, chunk_rows=8)
    c = ParquetSource(synthetic_file, seed=8, chunk_rows=8)
    ea, eb, ec = ids(a.next_batch(120)), ids(b.next_batch(120)), ids(c.next_batch(120))
    assert ea == eb and ea != ec
    every = {f"synthetic-0-{i:06d}" for i in range(40)}
    for e in range(3):
        assert sorted(ea[40 * e:40 * (e + 1)]) == sorted(every)      # each epoch: every row once
    assert ea[:40] != ea[40:80]                                       # a new order each epoch
    plain = ParquetSource(synthetic_file, shuffle=False)
    assert ids(plain.next_batch(40)) == [f"synthetic-0-{i:06d}" for i in range(40)]


def test_resume_gives_the_same_next_samples(synthetic_file):
    a = ParquetSource(synthetic_file, seed=1, chunk_rows=8, window=2)
    a.next_batch(7)
    a.next_batch(30)                                  # mid second epoch
    state = json.loads(json.dumps(a.state_dict()))    # survives a checkpoint file
    expected = ids(a.next_batch(50))
    b = ParquetSource(synthetic_file, seed=1, chunk_rows=8, window=2)
    b.load_state_dict(state)
    assert ids(b.next_batch(50)) == expected
    with pytest.raises(ValueError):
        ParquetSource(synthetic_file, seed=2, chunk_rows=8, window=2).load_state_dict(state)


def test_resume_exactly_at_an_epoch_boundary(synthetic_file):
    # A checkpoint taken right after the last row of an epoch (position == num_rows): the resumed stream
    # starts the next epoch's order, nothing skipped or repeated (peers lose a batch here, verl #7401).
    a = ParquetSource(synthetic_file, seed=3, chunk_rows=8, window=2)
    first = ids(a.next_batch(40))
    state = json.loads(json.dumps(a.state_dict()))
    assert (state["epoch"], state["position"]) == (0, 40)
    expected = ids(a.next_batch(40))
    b = ParquetSource(synthetic_file, seed=3, chunk_rows=8, window=2)
    b.load_state_dict(state)
    resumed = ids(b.next_batch(40))
    assert resumed == expected and sorted(resumed) == sorted(first) and resumed != first


def test_memory_is_bounded_by_the_window(tmp_path):
    # one big row group of 60 rows read in slices of 8: at most window * 8 rows are held
    path = write_rows(tmp_path / "big.parquet", (synthetic_row(i, 56) for i in range(60)),
                      extra=("reasoning", "kind"), row_group_size=60)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    src = ParquetSource(path, seed=0, chunk_rows=8, window=2)
    seen = []
    for _ in range(6):
        seen += ids(src.next_batch(10))
        assert len(src._window[3]) <= 16
    assert sorted(seen) == sorted(f"synthetic-0-{i:06d}" for i in range(60))


def test_directory_of_files(tmp_path):
    write_synthetic(tmp_path / "d" / "a.parquet", 5, image_size=56, seed=0)
    write_synthetic(tmp_path / "d" / "b.parquet", 5, image_size=56, seed=1)
    src = ParquetSource(tmp_path / "d", seed=0)
    assert len(src) == 10 and len(set(ids(src.next_batch(10)))) == 10


def test_corrupt_rows_are_skipped_and_counted(tmp_path, caplog):
    bad_mask = good_row(90)
    bad_mask["mask"] = {"size": [6, 8], "counts": "0<"}                 # runs do not cover 6x8
    wrong_size = good_row(91)
    wrong_size["mask"] = encode_rle(np.ones((5, 5), bool))
    rows = [good_row(0),
            {**good_row(1), "image": b"definitely not an image"},
            {**good_row(2), "image": png_declaring(30000, 30000), "height": 30000, "width": 30000},
            {**good_row(3), "mask": None, "bbox": None, "points": None},
            bad_mask, wrong_size,
            {**good_row(4), "problem": None},
            {**good_row(5), "height": 99},
            {**good_row(6), "bbox": [2, 1, 50, 3]},
            {**good_row(7), "mask": None},                                # no mask: still a sample
            good_row(8)]
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    src = ParquetSource(path, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        got = src.next_batch(3)
    assert ids(got) == ["r0", "r7", "r8"]
    assert got[1].mask_rle is None
    assert dict(src.skipped) == {"bad_image": 1, "image_too_large": 1, "missing_field": 2, "bad_mask": 2,
                                 "size_mismatch": 1, "bad_geometry": 1}
    assert "r1" in caplog.text and "bad_image" in caplog.text
    # Counted where an operator looks (MLflow, per GRPO step) and summarised once per epoch.
    assert src.skipped_metrics() == {"data/skipped_rows": 8, "data/skipped_rows/bad_image": 1,
                                     "data/skipped_rows/image_too_large": 1, "data/skipped_rows/missing_field": 2,
                                     "data/skipped_rows/bad_mask": 2, "data/skipped_rows/size_mismatch": 1,
                                     "data/skipped_rows/bad_geometry": 1}
    with caplog.at_level(logging.INFO, logger="data.dataset"):
        src.next_batch(4)  # crosses into epoch 1, then into epoch 2
    summaries = [r.getMessage() for r in caplog.records if "done:" in r.getMessage()]
    assert len(summaries) == 2 and "epoch 0" in summaries[0] and "11 rows, 3 served, 8 skipped" in summaries[0]
    assert "epoch 1" in summaries[1] and "8 skipped" in summaries[1]
    assert src.skipped_metrics()["data/skipped_rows"] == 16  # epoch 2 so far: r0 only


def test_pixel_limit_is_configurable(tmp_path):
    path = write_rows(tmp_path / "x.parquet", [good_row(0, w=64, h=64) | {"bbox": [2, 1, 5, 3]}])
    assert len(list(iter_samples(path))) == 1
    src = ParquetSource(path, max_image_pixels=1000)
    assert list(src.iter_epoch()) == [] and src.skipped["image_too_large"] == 1


def test_all_rows_bad_raises_instead_of_spinning(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{**good_row(i), "image": b"x"} for i in range(3)]), path)
    with pytest.raises(RuntimeError):
        ParquetSource(path).next_batch(1)


def test_segzero_released_rows(tmp_path):
    # Seg-Zero's layout: 840x840 stored image (HF image struct), solution in 840 space, original size
    rows = [{"id": "z0", "problem": "the cat", "img_height": 480, "img_width": 640,
             "image": {"bytes": png(840, 840), "path": None},
             "solution": "<box>(10,20),(300,400)</box><points>(100,200),(150,250)</points>"},
            {"id": "z1", "problem": "x", "img_height": 480, "img_width": 640,
             "image": {"bytes": png(840, 840), "path": None}, "solution": "garbage"}]
    path = tmp_path / "segzero.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    src = ParquetSource(path, shuffle=False)
    (s,) = list(src.iter_epoch())
    assert (s.width, s.height, s.mask_rle) == (840, 840, None)
    assert s.bbox == [10, 20, 300, 400] and s.points == [[100, 200], [150, 250]]
    assert s.solution(840) == rows[0]["solution"]
    assert src.skipped == {"bad_solution": 1}


def test_sample_model_space():
    s = Sample(id="a", image=Image.new("RGB", (200, 100)), problem="the red circle", mask_rle=None,
               bbox=[10, 20, 150, 80], points=[[50, 50], [199, 99]], height=100, width=200, source="t",
               reasoning="red circle")
    # x * 112/200 + 0.5 and y * 112/100 + 0.5, truncated, clamped to 0..111
    assert s.solution(112) == "<box>(6,22),(84,90)</box><points>(28,56),(111,111)</points>"
    assert s.model_image(112).size == (112, 112)
    assert s.reference_answer(112) == ('<think>red circle</think><answer>{"bbox":[6,22,84,90],'
                                       '"points_1":[28,56],"points_2":[111,111]}</answer>')
    assert json.loads(s.solution(112, "multi_object")) == [{"bbox_2d": [6, 22, 84, 90], "point_2d": [28, 56]}]
