"""What a job starts from (data/prepare.py, policy/prepare.py): the synthetic data and tiny-policy
settings reach the files a run reads; the held-out splits are content-disjoint from training."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from config import ConfigError, load_config
from data.dataset import ParquetSource
from data.prepare import ood_options, prepare_data
from policy.prepare import prepare_policy


def rows(path):
    return list(ParquetSource(path, shuffle=False).iter_epoch())


def test_synthetic_seed_and_barcodes_reach_every_split(tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'a'}", "data.synthetic_train_size=4",
                             "data.synthetic_eval_size=3", "data.synthetic_seed=7", "data.synthetic_barcodes=off"])
    train, held_out = prepare_data(cfg)
    assert [s.id for s in rows(train)] == [f"synthetic-7-{i:06d}" for i in range(4)]
    for role, seed in (("val", 8), ("eval", 9), ("ood", 10)):  # the next seeds: disjoint rows
        assert [s.id for s in rows(held_out[role])] == [f"synthetic-{seed}-{i:06d}" for i in range(3)]
    with_codes = load_config(None, [f"train.output_dir={tmp_path / 'b'}", "data.synthetic_train_size=4",
                                    "data.synthetic_eval_size=3", "data.synthetic_seed=7"])
    coded = rows(prepare_data(with_codes)[0])
    for plain, tagged in zip(rows(train), coded):  # same scenes; only the barcode rows differ
        assert plain.problem == tagged.problem and plain.bbox == tagged.bbox
        assert not np.array_equal(np.asarray(plain.image), np.asarray(tagged.image))


@pytest.mark.parametrize("rules", ["segzero", "multi_object"])
def test_held_out_splits_never_ask_a_training_rows_query_about_its_target(tmp_path, caplog, rules):
    """Counted on the files a job reads: no val, test or OOD row shares its query and target mask(s) with
    a training row; the same seeds drawn without the content split share many (the count can see them)."""
    import logging

    from data.prepare import log_shared_content
    from data.splits import count_shared
    from data.synthetic import write_synthetic

    cfg = load_config(None, [f"train.output_dir={tmp_path}", "data.synthetic_train_size=400",
                             "data.synthetic_eval_size=150", f"reward.rules={rules}"])
    train, held_out = prepare_data(cfg)
    with caplog.at_level(logging.INFO, logger="data.prepare"):
        assert log_shared_content(train, held_out) == {"val": 0, "eval": 0, "ood": 0}
    assert "val 0, eval 0, ood 0" in caplog.text
    d = cfg.data
    unsplit = write_synthetic(tmp_path / "unsplit.parquet", 150, 112, d.synthetic_seed + 2,
                              kinds=tuple(d.synthetic_kinds), num_shapes=tuple(d.synthetic_shapes),
                              barcodes=d.synthetic_barcodes, multi_object=rules == "multi_object")
    assert count_shared(train, unsplit) > 0
    with caplog.at_level(logging.WARNING, logger="data.prepare"):
        log_shared_content(train, {"eval": str(unsplit)})
    assert "measure recall" in caplog.text
    # the OOD split: more shapes than training, and the shape-only kind added
    ood_kinds = set(pq.read_table(held_out["ood"], columns=["kind"]).column("kind").to_pylist())
    assert "shape" in ood_kinds and ood_kinds <= set(d.synthetic_kinds) | {"shape", "all_shape"}


def test_ood_split_settings():
    assert ood_options(["colour_shape", "colour"], (1, 2), 16, False) == dict(
        kinds=("colour_shape", "colour", "shape"), num_shapes=(3, 4))
    assert ood_options(["colour", "all_colour"], (1, 3), 16, True)["num_shapes"] == (4, 5)
    assert ood_options(["colour"], (1, 3), 4, False)["num_shapes"] == (4, 4)  # a 2x2 grid holds 4 shapes


@pytest.mark.parametrize("role,field", [("val", "val_path"), ("eval", "eval_path"), ("ood", "ood_path")])
def test_held_out_paths_are_read_instead_of_generated(tmp_path, role, field):
    from data.synthetic import write_synthetic

    own = write_synthetic(tmp_path / "mine.parquet", 2, seed=42)
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'run'}", "data.synthetic_train_size=2",
                             "data.synthetic_eval_size=1", f"data.{field}={own}"])
    _, held_out = prepare_data(cfg)
    assert held_out[role] == str(own) and [s.id for s in rows(own)] == ["synthetic-42-000000", "synthetic-42-000001"]
    assert sorted(held_out) == ["eval", "ood", "val"]
    with pytest.raises(RuntimeError, match=f"data.{field}: not found"):
        prepare_data(load_config(None, [f"train.output_dir={tmp_path / 'run'}", "data.synthetic_train_size=2",
                                        f"data.{field}={tmp_path / 'missing.parquet'}"]))


def test_a_given_training_set_gets_only_the_held_out_splits_given(tmp_path):
    """No synthetic split is evaluated beside a user's data; selecting needs a validation split."""
    from data.synthetic import write_synthetic

    own = str(write_synthetic(tmp_path / "mine.parquet", 2, seed=42))
    cfg = load_config(None, [f"train.output_dir={tmp_path}", f"data.train_path={own}", f"data.val_path={own}"])
    assert prepare_data(cfg) == (own, {"val": own})
    with pytest.raises(ConfigError, match="data.val_path: eval.keep_best selects"):
        load_config(None, [f"data.train_path={own}", f"data.eval_path={own}"])
    load_config(None, [f"data.train_path={own}", f"data.eval_path={own}", "eval.keep_best=false"])
    with pytest.raises(ConfigError, match="data.eval_path: evaluations need a held-out split"):
        load_config(None, [f"data.train_path={own}", "eval.keep_best=false"])
    load_config(None, [f"data.train_path={own}", "eval.enabled=false"])


def test_tiny_policy_is_built_with_the_configured_shape(tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "model.tiny_hidden_size=192", "model.tiny_heads=3",
                             "model.tiny_layers=3", "model.tiny_vision_hidden_size=96", "model.tiny_vision_layers=2",
                             "model.tiny_number_code=false", "model.tiny_position_reader=false"])
    path = prepare_policy(cfg)
    hf = json.loads((tmp_path / "tiny_policy" / "config.json").read_text())
    text = hf.get("text_config", hf)
    assert (text["hidden_size"], text["num_attention_heads"], text["num_hidden_layers"]) == (192, 3, 3)
    assert (hf["vision_config"]["hidden_size"], hf["vision_config"]["depth"]) == (96, 2)
    assert json.loads((tmp_path / "tiny_policy" / "tiny_policy.json").read_text()) == {
        "image_size": 112, "hidden_size": 192, "layers": 3, "heads": 3, "vision_hidden_size": 96,
        "vision_layers": 2, "seed": 0}
    assert path == str(tmp_path / "tiny_policy")
