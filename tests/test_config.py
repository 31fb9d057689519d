import subprocess
import sys

import pytest

from config import REPO, ConfigError, field_table, load_config, reference_page


def test_default_and_cluster_configs_validate():
    default = load_config()
    assert default.rollout.group_size >= 2 and default.reward.segmenter == "grabcut"
    for name in ("segzero_7b.yaml", "segzero_3b.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert (cfg.rollout.prompts_per_step, cfg.rollout.group_size) == (16, 8)
        assert cfg.learner.lr == 1e-6 and cfg.learner.kl_kind == "k3" and cfg.learner.kl_coef == 5e-3
        assert cfg.model.image_size == 840 and cfg.reward.segmenter == "sam2"
    qwen3 = load_config(REPO / "configs" / "qwen3vl_8b.yaml")  # Seg-Zero's recipe at Qwen3-VL's 32-px patches
    assert (qwen3.rollout.prompts_per_step, qwen3.rollout.group_size, qwen3.learner.lr) == (16, 8, 1e-6)
    assert qwen3.model.image_size == 832 and qwen3.reward.coordinates == "auto"


def test_dotted_overrides_apply_with_types():
    cfg = load_config(None, ["rollout.group_size=8", "cluster.reward_workers=2", "learner.lr=3e-6",
                             "cluster.reward.num_gpus=0.25"])
    assert cfg.rollout.group_size == 8 and cfg.cluster.reward_workers == 2
    assert cfg.learner.lr == 3e-6 and cfg.cluster.reward.num_gpus == 0.25
    # a bare `off` is YAML 1.1's false: still the mask mode "off"
    assert load_config(None, ["reward.mask_iou=off"]).reward.mask_iou == "off"


@pytest.mark.parametrize("override, field", [
    ("rollout.group_size=1", "rollout.group_size"),
    ("rollout.grop_size=4", "rollout.grop_size"),
    ("learner.zero_stage=1", "learner.zero_stage"),
    ("reward.rules=fancy", "reward.rules"),
    ("model.image_size=100", "model"),
    ("reward.segmenter=sam2", "sam2_checkpoint"),
    ("cluster.learner.num_cpus=-1", "cluster.learner.num_cpus"),
    ("data.synthetic_kinds=[all_colour]", "data.synthetic_kinds"),  # several targets under single-object rules
    ("data.synthetic_shapes=[3,2]", "data.synthetic_shapes"),
    ("rollout.weight_sync=nccl", "rollout.weight_sync"),  # the backend follows the device: collective
    ("model.tiny_layers=1", "tiny_layers"),  # the tiny policy's grounding circuit spans two layers
])
def test_bad_value_names_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert field in str(err.value)


def test_collective_sync_needs_one_kind_of_device():
    with pytest.raises(ConfigError, match="rollout.weight_sync: collective needs"):
        load_config(None, ["rollout.weight_sync=collective", "cluster.learner.num_gpus=1"])
    with pytest.raises(ConfigError, match="NCCL puts no two ranks of a group on one GPU"):
        load_config(None, ["rollout.weight_sync=collective", "cluster.learner.num_gpus=1",
                           "cluster.rollout.num_gpus=0.5"])
    assert load_config(None, ["rollout.weight_sync=collective", "cluster.learner.num_gpus=1",
                              "cluster.rollout.num_gpus=1"]).rollout.weight_sync == "collective"


def test_synthetic_data_follows_the_rule_set():
    single, multi = load_config(), load_config(None, ["reward.rules=multi_object"])
    assert single.data.synthetic_kinds == ["colour_shape", "colour"] and single.data.synthetic_shapes == (1, 2)
    assert (multi.data.synthetic_kinds == ["colour_shape", "colour", "all_colour"]
            and multi.data.synthetic_shapes == (1, 3))
    chosen = load_config(None, ["reward.rules=multi_object", "data.synthetic_kinds=[all_shape]",
                                "data.synthetic_shapes=[2,4]"])
    assert chosen.data.synthetic_kinds == ["all_shape"] and chosen.data.synthetic_shapes == (2, 4)


def test_launch_rejects_bad_config_before_starting_anything():
    proc = subprocess.run([sys.executable, "launch.py", "rollout.temperature=-1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "rollout.temperature" in proc.stderr and "Traceback" not in proc.stderr


def test_every_field_is_documented():
    rows = field_table()
    assert len(rows) > 40
    assert [name for name, _, desc in rows if not desc] == []


def test_the_config_reference_page_is_current():
    # docs/config.md is generated: a field added, renamed or re-described without regenerating it fails here
    assert (REPO / "docs" / "config.md").read_text() == reference_page(), "run: python config.py > docs/config.md"
