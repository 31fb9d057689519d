"""The vLLM engine arguments of the GPU recipes, built with the GPU branch forced and validated by vLLM's
own EngineArgs and ModelConfig on this CPU machine (the model's shape from configs/models/: no weights,
no tokenizer). What a GPU node would reject at engine start fails here instead."""
import pytest

from config import REPO, load_config
from rollout.worker import engine_args

RECIPES = {"segzero_7b": "Qwen2.5-VL-7B-Instruct", "segzero_3b": "Qwen2.5-VL-3B-Instruct",
           "segzero_7b_mask_iou": "Qwen2.5-VL-7B-Instruct", "qwen3vl_8b": "Qwen3-VL-8B-Instruct"}


@pytest.mark.parametrize("recipe, model", RECIPES.items())
@pytest.mark.parametrize("tp", [1, 2])
def test_gpu_engine_args_pass_vllms_own_validation(recipe, model, tp):
    from vllm import EngineArgs

    cfg = load_config(REPO / "configs" / f"{recipe}.yaml", [f"rollout.tensor_parallel_size={tp}"])
    args = engine_args(cfg, str(REPO / "configs" / "models" / model), seed=0, on_gpu=True)
    assert args["gpu_memory_utilization"] == cfg.rollout.gpu_memory_utilization and "kv_cache_memory_bytes" not in args
    assert args["dtype"] == "bfloat16"
    assert ("distributed_executor_backend" in args) == (tp > 1)
    model_config = EngineArgs(**args, skip_tokenizer_init=True).create_model_config()
    assert model_config.max_model_len == cfg.rollout.max_model_len
    assert model_config.hf_config.model_type == ("qwen3_vl" if recipe == "qwen3vl_8b" else "qwen2_5_vl")
    pixels = cfg.model.image_size ** 2  # 840 (832) px images reach vLLM unresized, as the learner sees them
    assert (model_config.multimodal_config.mm_processor_kwargs["size"]
            == {"shortest_edge": pixels, "longest_edge": pixels})


def test_cpu_engine_args_size_the_kv_cache_in_bytes():
    cfg = load_config(None, [])
    args = engine_args(cfg, "unused", seed=0, on_gpu=False)
    assert args["kv_cache_memory_bytes"] == int(cfg.rollout.kv_cache_gib * 2**30)
    assert "gpu_memory_utilization" not in args and args["dtype"] == "float32"
