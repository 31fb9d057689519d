import io
import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.convert import main as convert
from data.dataset import ParquetSource, iter_samples
from data.masks import decode_rle, encode_rle
from data.refcocog import load_refs


def encoded(w, h, fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 150)).save(buf, format=fmt)
    return buf.getvalue()


def rect(h, w, x1, y1, x2, y2):
    """Inclusive pixel rectangle."""
    m = np.zeros((h, w), bool)
    m[y1:y2 + 1, x1:x2 + 1] = True
    return m


def rows_of(path):
    return {r["id"]: r for r in pq.read_table(path).to_pylist()}


def test_segzero_released_parquet(tmp_path):
    solution = "<box>(10,20),(300,400)</box><points>(100,200),(151,251)</points>"
    rows = [{"id": "a", "problem": "the dog", "solution": solution, "img_height": 480, "img_width": 640,
             "image": {"bytes": encoded(840, 840), "path": None}},
            # stored at 420x420: 840-space coordinates are halved, int(v / 2 + 0.5)
            {"id": "b", "problem": "the cat", "solution": solution, "img_height": 100, "img_width": 100,
             "image": {"bytes": encoded(420, 420), "path": None}},
            {"id": "c", "problem": "bad", "solution": "no box here", "img_height": 1, "img_width": 1,
             "image": {"bytes": encoded(840, 840), "path": None}}]
    src = tmp_path / "hf" / "data"
    src.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), src / "train-00000-of-00001.parquet")
    out = tmp_path / "segzero.parquet"
    convert(["segzero", "--in", str(tmp_path / "hf"), "--out", str(out), "--split", "train"])
    got = rows_of(out)
    assert set(got) == {"a", "b"}
    a, b = got["a"], got["b"]
    assert (a["width"], a["height"], a["orig_width"], a["orig_height"]) == (840, 840, 640, 480)
    assert a["bbox"] == [10, 20, 300, 400] and a["points"] == [[100, 200], [151, 251]] and a["mask"] is None
    assert b["bbox"] == [5, 10, 150, 200] and b["points"] == [[50, 100], [76, 126]]
    assert a["source"] == "segzero"
    samples = list(iter_samples(out))
    assert [s.id for s in samples] == ["a", "b"] and samples[0].solution(840) == solution


def test_visionreasoner_arrow_stream(tmp_path):
    solution = json.dumps([{"bbox_2d": [10, 10, 100, 100], "point_2d": [50, 60]},
                           {"bbox_2d": [200, 210, 400, 420], "point_2d": [300, 310]}])
    table = pa.Table.from_pylist([{"id": "m0", "problem": "'the cups' and 'the plate'", "solution": solution,
                                   "image": {"bytes": encoded(840, 840), "path": None},
                                   "img_height": 600, "img_width": 800}])
    arrow = tmp_path / "train" / "data-00000-of-00001.arrow"   # datasets' save_to_disk layout
    arrow.parent.mkdir()
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    out = tmp_path / "vr.parquet"
    convert(["visionreasoner", "--in", str(tmp_path), "--out", str(out)])
    row = rows_of(out)["m0"]
    assert json.loads(row["objects"]) == json.loads(solution)
    assert row["bbox"] == [10, 10, 100, 100] and row["points"] == [[50, 60], [50, 60]]
    assert row["source"] == "visionreasoner"
    (s,) = iter_samples(out)
    assert json.loads(s.solution(420, "multi_object"))[1] == {"bbox_2d": [100, 105, 200, 210], "point_2d": [150, 155]}


def test_released_evaluation_rows_with_bool_masks(tmp_path):
    mask = rect(10, 12, 2, 3, 9, 7)
    rows = [{"image": {"bytes": encoded(12, 10), "path": None}, "text": "the box.", "mask": mask.tolist(),
             "image_id": "img1", "ann_id": "img1", "img_height": 10, "img_width": 12}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    out = tmp_path / "eval.parquet"
    convert(["segzero", "--in", str(tmp_path / "test.parquet"), "--out", str(out)])
    row = rows_of(out)["img1_img1"]
    assert np.array_equal(decode_rle(row["mask"]), mask)
    assert row["bbox"] == [2, 3, 9, 7] and row["points"] == [[4, 5], [7, 5]]   # see test_refcocog


def write_reasonseg(tmp_path, h=16, w=20):
    """A ReasonSeg folder in LISA's layout with a val split of two images (one without a target)."""
    val = tmp_path / "ReasonSeg" / "val"
    val.mkdir(parents=True)
    (val / "img1.jpg").write_bytes(encoded(w, h, "JPEG"))
    (val / "img1.json").write_text(json.dumps({
        "text": ["what would you sit on?", "the chair"], "is_sentence": True,
        "shapes": [{"label": "target", "points": [[2, 3], [10, 3], [10, 8], [2, 8]]},
                   {"label": "ignore", "points": [[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]},  # painted first
                   {"label": "flag", "points": [[0, 0], [5, 0], [5, 5]]}]}))
    (val / "img2.jpg").write_bytes(encoded(w, h, "JPEG"))
    (val / "img2.json").write_text(json.dumps({"text": ["nothing"], "is_sentence": False,
                                               "shapes": [{"label": "ignore", "points": [[0, 0], [4, 0], [4, 4]]}]}))
    return val


def test_reasonseg_lisa_layout(tmp_path):
    h, w = 16, 20
    val = write_reasonseg(tmp_path, h, w)
    out = tmp_path / "reasonseg.parquet"
    convert(["reasonseg", "--in", str(tmp_path / "ReasonSeg"), "--split", "val", "--out", str(out)])
    got = rows_of(out)
    assert set(got) == {"img1_0", "img1_1"}                      # img2 has no target: skipped
    row = got["img1_0"]
    target = rect(h, w, 2, 3, 10, 8)                              # LISA convention: outline included
    assert np.array_equal(decode_rle(row["mask"]), target)
    assert np.array_equal(decode_rle(row["ignore_mask"]), ~target)
    assert row["bbox"] == [2, 3, 10, 8]
    # distance transform max 3 first at (4, 5); median distance to it over 54 pixels is (3 + sqrt 10) / 2;
    # the first farther pixel with distance transform 3 is (8, 5)
    assert row["points"] == [[4, 5], [8, 5]]
    assert row["image"] == (val / "img1.jpg").read_bytes() and row["is_sentence"] is True
    assert got["img1_1"]["problem"] == "the chair"
    first = tmp_path / "first.parquet"
    convert(["reasonseg", "--in", str(val), "--out", str(first), "--first-query"])
    assert set(rows_of(first)) == {"img1_0"}
    (s,) = [s for s in iter_samples(out) if s.id == "img1_0"]
    assert s.ignore_rle is not None


def write_refcocog(tmp_path, name="refcocog", refs_file="refs(umd).p", split="val"):
    """refer's layout for one dataset (RefCOCOg, RefCOCO, RefCOCO+): two refs of ``split``, one of train."""
    root, images = (tmp_path / "refer_seg" / name,
                    tmp_path / "refer_seg" / "images" / "mscoco" / "images" / "train2014")
    root.mkdir(parents=True)
    images.mkdir(parents=True, exist_ok=True)
    (images / "COCO_train2014_000000000001.jpg").write_bytes(encoded(14, 12, "JPEG"))
    crowd = rect(12, 14, 0, 0, 3, 1)
    runs = encode_rle(crowd)
    uncompressed = {"size": [12, 14], "counts": [int(c) for c in _runs(crowd)]}
    coco = {"images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 12, "width": 14}],
            "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0,
                             "segmentation": [[2, 3, 10, 3, 10, 8, 2, 8]]},
                            {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 1, "segmentation": uncompressed},
                            {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 1, "segmentation": runs}]}
    (root / "instances.json").write_text(json.dumps(coco))
    refs = [{"ref_id": 1, "ann_id": 10, "image_id": 1, "split": split, "category_id": 1,
             "sentences": [{"raw": "the grey block.", "sent": "the grey block", "sent_id": 100},
                           {"raw": "a rectangle", "sent": "a rectangle", "sent_id": 101}]},
            {"ref_id": 2, "ann_id": 11, "image_id": 1, "split": split, "category_id": 1,
             "sentences": [{"raw": "top left strip", "sent": "top left strip", "sent_id": 102}]},
            {"ref_id": 3, "ann_id": 12, "image_id": 1, "split": "train", "category_id": 1,
             "sentences": [{"raw": "strip", "sent": "strip", "sent_id": 103}]}]
    with open(root / refs_file, "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return root, crowd


def _runs(mask):
    flat = mask.T.ravel().astype(int)          # COCO runs are column-major, starting with zeros
    runs, value, count = [], 0, 0
    for v in flat:
        if v == value:
            count += 1
        else:
            runs.append(count)
            value, count = v, 1
    return runs + [count]


def test_refcocog(tmp_path):
    root, crowd = write_refcocog(tmp_path)
    out = tmp_path / "val.parquet"
    convert(["refcocog", "--in", str(root), "--split", "val", "--out", str(out)])   # LISA image layout
    got = rows_of(out)
    assert set(got) == {"refcocog-1-100", "refcocog-1-101", "refcocog-2-102"}
    row = got["refcocog-1-100"]
    assert row["problem"] == "the grey block." and row["height"] == 12 and row["width"] == 14
    # COCO polygon (2,3)-(10,8) covers pixel centres inside it: x 2..9, y 3..7
    assert np.array_equal(decode_rle(row["mask"]), rect(12, 14, 2, 3, 9, 7))
    assert row["bbox"] == [2, 3, 9, 7]
    # distance transform max 3 only on row 5, first at (4, 5); median distance to it over the 40
    # pixels is sqrt 5; the only farther pixel with distance transform 3 is (7, 5)
    assert row["points"] == [[4, 5], [7, 5]]
    assert np.array_equal(decode_rle(got["refcocog-2-102"]["mask"]), crowd)   # uncompressed RLE annotation
    per_ref = tmp_path / "train.parquet"
    convert(["refcocog", "--in", str(root), "--split", "train", "--per", "ref", "--out", str(per_ref),
             "--images", str(tmp_path / "refer_seg" / "images" / "mscoco" / "images" / "train2014")])
    assert list(rows_of(per_ref)) == ["refcocog-3"]
    assert np.array_equal(decode_rle(rows_of(per_ref)["refcocog-3"]["mask"]), crowd)  # compressed RLE
    src = ParquetSource(out)
    assert len(src.next_batch(3)) == 3 and not src.skipped


@pytest.mark.parametrize("name", ["refcoco", "refcoco+"])
def test_refcoco_and_refcoco_plus_read_unc_refs(tmp_path, name):
    """RefCOCO and RefCOCO+ share RefCOCOg's layout with UNC's refs file and testA/testB splits; their rows
    are named by their dataset."""
    root, _ = write_refcocog(tmp_path, name, "refs(unc).p", "testA")
    out = tmp_path / f"{name}.parquet"
    convert([name, "--in", str(root), "--split", "testA", "--out", str(out)])
    got = rows_of(out)
    assert set(got) == {f"{name}-1-100", f"{name}-1-101", f"{name}-2-102"}
    assert {r["source"] for r in got.values()} == {name}
    assert np.array_equal(decode_rle(got[f"{name}-1-100"]["mask"]), rect(12, 14, 2, 3, 9, 7))
    with pytest.raises(FileNotFoundError):  # not RefCOCOg's refs file
        convert([name, "--in", str(root), "--split", "testA", "--out", str(out), "--refs", "refs(umd).p"])


def test_refs_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(pickle.UnpicklingError):
        load_refs(path)
