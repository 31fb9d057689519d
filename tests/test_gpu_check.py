"""benchmarks/gpu_check.py runs end to end on CPU at tiny sizes, as the GPU machine will run it: in a
fresh process where ray and vllm cannot be imported (absent there), learner steps, both sync paths and
SAM2 reward scoring; every reported number is positive and the sync moved every weight of the policy
exactly once. Only ZeRO-3 (the stage with gathers) runs here, to keep the test short; ZeRO-2 takes
the same code minus the gathers and is what the Learner tests exercise most."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_ray_no_vllm(tmp_path) -> str:
    """A PYTHONPATH entry whose ray/ and vllm/ packages fail to import, as on the GPU machine;
    spawned learner processes inherit it through the environment."""
    for name in ("ray", "vllm"):
        pkg = tmp_path / "blocked" / name
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(f"raise ImportError('{name} is not installed on the GPU machine')\n")
    return str(tmp_path / "blocked")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["tiny", "qwen3_vl"])
def test_gpu_check_runs_on_cpu_without_ray_or_vllm(tmp_path, no_ray_no_vllm, family):
    """--family qwen3_vl: the tiny width in Qwen3-VL's shape with Qwen's real vocabulary (policy/build.py)."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": no_ray_no_vllm, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu", "--threads", "1",
         "--stages", "3", "--out", str(out), "--work-dir", str(tmp_path / "work"), "--family", family],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    report = json.loads(out.read_text())
    assert report["errors"] == {}
    assert report["stages"] == [3] and report["device"] == "cpu" and report["dtype"] == "float32"
    results = report["results"]
    for stage in report["stages"]:
        for key in ("step_s", "tokens_per_s", "resp_tokens_per_s", "model_tflops", "sync_host_gbps",
                    "sync_collective_gbps"):
            assert f"zero{stage}_{key}" in results
    for key in ("reward_samples_per_s", "reward_encode_ms", "reward_decode_ms", "policy_params"):
        assert key in results
    assert report["settings"]["family"] == family
    config = json.loads((tmp_path / "work" / "policy" / "config.json").read_text())
    assert config["model_type"] == ("qwen3_vl" if family == "qwen3_vl" else "qwen2_5_vl")
    if family == "qwen3_vl":  # the real vocabulary's head, and Qwen3-VL's 224-px multiple
        assert results["policy_head_params"] == 151936 * 128 and report["settings"]["image_size"] == 224
    bad = {k: v for k, v in results.items()
           if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0}
    assert not bad, f"fields that are not positive numbers: {bad}"

    # The sync moved every weight of the policy (none frozen) exactly once, at its full size.
    with safe_open(str(tmp_path / "work" / "policy" / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    n_bytes = 4 * sum(math.prod(s) for s in shapes.values())  # fp32 on CPU
    assert results["policy_params"] == sum(math.prod(s) for s in shapes.values())
    for stage in report["stages"]:
        assert results[f"zero{stage}_sync_tensors"] == len(shapes)
        assert results[f"zero{stage}_sync_bytes"] == n_bytes
        assert results[f"zero{stage}_sync_buckets"] > 1  # --tiny buckets are smaller than the model
    assert "model TFLOP/s" in proc.stdout and "reward sam2.1_hiera_t" in proc.stdout
