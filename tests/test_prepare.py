"""What a job starts from (data/prepare.py, policy/prepare.py): the synthetic data and tiny-policy
settings reach the files a run reads."""
import json

import numpy as np
import pytest

from config import load_config
from data.dataset import ParquetSource
from data.prepare import prepare_data
from policy.prepare import prepare_policy


def rows(path):
    return list(ParquetSource(path, shuffle=False).iter_epoch())


def test_synthetic_seed_and_barcodes_reach_both_splits(tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'a'}", "data.synthetic_train_size=4",
                             "data.synthetic_eval_size=3", "data.synthetic_seed=7", "data.synthetic_barcodes=off"])
    train, held_out = prepare_data(cfg)
    assert [s.id for s in rows(train)] == [f"synthetic-7-{i:06d}" for i in range(4)]
    assert [s.id for s in rows(held_out)] == [f"synthetic-8-{i:06d}" for i in range(3)]  # the next seed: disjoint
    with_codes = load_config(None, [f"train.output_dir={tmp_path / 'b'}", "data.synthetic_train_size=4",
                                    "data.synthetic_eval_size=3", "data.synthetic_seed=7"])
    coded = rows(prepare_data(with_codes)[0])
    for plain, tagged in zip(rows(train), coded):  # same scenes; only the barcode rows differ
        assert plain.problem == tagged.problem and plain.bbox == tagged.bbox
        assert not np.array_equal(np.asarray(plain.image), np.asarray(tagged.image))


def test_eval_path_is_read_instead_of_generated(tmp_path):
    from data.synthetic import write_synthetic

    own = write_synthetic(tmp_path / "mine.parquet", 2, seed=42)
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'run'}", "data.synthetic_train_size=2",
                             f"data.eval_path={own}"])
    _, held_out = prepare_data(cfg)
    assert held_out == str(own) and [s.id for s in rows(held_out)] == ["synthetic-42-000000", "synthetic-42-000001"]
    assert not (tmp_path / "run" / "data" / "eval.parquet").exists()
    with pytest.raises(RuntimeError, match="data.eval_path: not found"):
        prepare_data(load_config(None, [f"train.output_dir={tmp_path / 'run'}", "data.synthetic_train_size=2",
                                        f"data.eval_path={tmp_path / 'missing.parquet'}"]))


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
