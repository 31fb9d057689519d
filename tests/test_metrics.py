import math

import numpy as np
import pytest

from evaluation.metrics import SegMetrics


def box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_giou_and_ciou_hand_computed():
    gt1, pred1 = box(10, 10, 0, 4, 0, 4), box(10, 10, 0, 4, 2, 6)      # I = 8, U = 24
    gt2, pred2 = box(10, 10, 0, 2, 0, 2), box(10, 10, 0, 2, 0, 2)      # I = 4, U = 4
    m = SegMetrics(empty_empty=0.0, exclude_ignore=False)
    assert m.add(pred1, gt1) == pytest.approx(8 / 24)
    assert m.add(pred2, gt2) == 1.0
    r = m.result()
    assert r["giou"] == pytest.approx((1 / 3 + 1) / 2)
    assert r["ciou"] == pytest.approx(12 / 28)
    assert r["n"] == 2 and r["convention"] == "segzero"


def test_unparseable_answer_is_empty_prediction():
    gt = box(6, 6, 0, 3, 0, 3)                                          # 9 pixels
    m = SegMetrics.from_convention("lisa")
    assert m.add(None, gt) == 0.0
    assert (m.intersection, m.union) == (0, 9)


@pytest.mark.parametrize("convention, expected", [("lisa", 1.0), ("segzero", 0.0)])
def test_empty_gt_and_empty_prediction(convention, expected):
    m = SegMetrics.from_convention(convention)
    empty = np.zeros((5, 5), bool)
    assert m.add(empty, empty) == expected
    assert m.add(None, empty) == expected
    assert m.add(box(5, 5, 0, 1, 0, 2), empty) == 0.0                  # prediction on an empty target
    r = m.result()
    assert r["giou"] == pytest.approx(2 * expected / 3)
    assert r["ciou"] == 0.0                                             # I = 0, U = 2


def test_ignore_region_excluded_or_counted():
    gt = box(10, 10, 0, 2, 0, 5)          # 10 target pixels, rows 0-1
    ignore = box(10, 10, 2, 4, 0, 5)      # 10 ignore pixels, rows 2-3
    pred = box(10, 10, 0, 4, 0, 5)        # covers target and ignore: 20 pixels
    excluded = SegMetrics(empty_empty=0.0, exclude_ignore=True)
    assert excluded.add(pred, gt, ignore) == 1.0                        # I = 10, U = 10
    counted = SegMetrics(empty_empty=0.0, exclude_ignore=False)
    assert counted.add(pred, gt, ignore) == 1.0                         # target := 20 pixels, I = U = 20
    only_target = box(10, 10, 0, 2, 0, 5)
    assert excluded.add(only_target, gt, ignore) == 1.0                 # 10 / 10
    assert counted.add(only_target, gt, ignore) == 0.5                  # 10 / 20
    assert excluded.result()["convention"] == "empty_empty=0,ignore=excluded"
    assert counted.result()["convention"] == "segzero"


def test_merge_and_empty_result():
    a, b = SegMetrics(), SegMetrics()
    a.add(box(4, 4, 0, 2, 0, 2), box(4, 4, 0, 2, 0, 2))
    b.add(None, box(4, 4, 0, 1, 0, 1))
    a.merge(b)
    assert a.result()["n"] == 2 and a.result()["ciou"] == pytest.approx(4 / 5)
    with pytest.raises(ValueError):
        a.merge(SegMetrics.from_convention("lisa"))
    assert math.isnan(SegMetrics().result()["giou"])


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        SegMetrics().add(np.zeros((3, 3), bool), np.zeros((4, 4), bool))


def test_learning_curve_draws_the_standard_error_band(tmp_path):
    from PIL import Image

    from evaluation.curve import plot_learning_curve

    history = {"reward/total": [(1, 2.0), (2, 2.5)], "reward/think_format": [(1, 1.0), (2, 1.0)],
               "eval/reward": [(0, 2.1), (2, 2.6)], "eval/giou_segzero": [(0, 0.40), (2, 0.55)],
               "eval/giou_segzero_se": [(0, 0.05), (2, 0.05)]}
    with_band = np.asarray(Image.open(plot_learning_curve(history, tmp_path / "a.png")).convert("RGB")).astype(int)
    history.pop("eval/giou_segzero_se")
    without = np.asarray(Image.open(plot_learning_curve(history, tmp_path / "b.png")).convert("RGB")).astype(int)
    assert with_band.shape == without.shape
    assert (np.abs(with_band - without).sum(axis=-1) > 30).sum() > 500  # the shaded band (and its legend entry)
