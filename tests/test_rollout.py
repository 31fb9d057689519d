"""RolloutWorker on a real vLLM CPU engine with the tiny Qwen2.5-VL, checked against transformers.

One engine serves the whole module, once per way of running it (eager, compiled, in vLLM's own
processes: the ``worker`` fixture). Tests run in file order and the later ones change the engine's
weights: initial-weight checks come first, the last test restores them.

Parity tolerance: LOGPROB_TOL = 2e-4 on |log p_vLLM - log p_transformers|, both fp32. Measured on
these machines: <= 2e-6 on the initial weights and after pushing N(0, 0.05)-perturbed weights
(fp32 rounding; kernels differ). Real faults are far larger: leaving one perturbed vision tensor
stale gave 4e-3, one language-model tensor ~1, skipping the cache resets after an update 0.3-2.4.
So 2e-4 sits 100x above the noise and 20x below the smallest fault measured.
"""
import copy
import gc

import numpy as np
import pytest
import torch
from PIL import Image

import config
from policy.prompt import chat_prompt
from policy.tiny import build_tiny_policy

pytestmark = pytest.mark.slow

LOGPROB_TOL = 2e-4
IMAGE_SIZE = 112
ANSWER = ('<think>the red one</think><answer>{"bbox":[10,20,30,40],"points_1":[15,25],'
          '"points_2":[20,30]}</answer><|im_end|>')


def _image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return str(build_tiny_policy(tmp_path_factory.mktemp("tiny_policy"), image_size=IMAGE_SIZE))


@pytest.fixture(scope="module", params=[(True, True), (False, True), (True, False)],
                ids=["eager", "compiled", "processes"])
def worker(policy_dir, request):
    """The engine three ways: eager in this process (the CPU default), compiled (rollout.enforce_eager=false:
    vLLM's torch.compile path, weights loaded into a compiled model included), and in vLLM's own processes
    (rollout.engine_in_process=false, as on a GPU: weights cross as safetensors bytes)."""
    from rollout.worker import RolloutWorker

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; more threads than free cores is slower
    cfg = config.Config()
    cfg.model.image_size = IMAGE_SIZE
    cfg.rollout.max_model_len = 1024
    cfg.rollout.kv_cache_gib = 0.5
    cfg.rollout.enforce_eager, cfg.rollout.engine_in_process = request.param
    w = RolloutWorker(cfg, policy_dir, seed=0)
    # the engine runs where the setting says (after the in-process engines of this module)
    assert ("Inproc" in type(w.llm.llm_engine.engine_core).__name__) == cfg.rollout.engine_in_process
    yield w
    del w
    gc.collect()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf(policy_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(policy_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(policy_dir)


@pytest.fixture(scope="module")
def prompt():
    return {"sample_id": "img0", "problem": "The red square.", "image": _image(0)}


def hf_logprobs(model, processor, prompt: dict, tokens: list[int], rule=None) -> np.ndarray:
    """log p(tokens[t] | prompt, tokens[:t]) from transformers, fp32: of the raw model, or of the
    distribution ``rule`` (policy/sampling.py) makes of its logits, as the learner scores them."""
    enc = processor(text=[chat_prompt(prompt["problem"])], images=[prompt["image"]], return_tensors="pt")
    response = torch.tensor([tokens])
    input_ids = torch.cat([enc["input_ids"], response], 1)
    extra = {}
    if "mm_token_type_ids" in enc:  # 0 = text for the appended response
        extra["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(response)], 1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                       pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                       **extra).logits[0].float()
    z = logits[-len(tokens) - 1:-1]
    logp = torch.log_softmax(z if rule is None else rule.apply(z[None])[0], dim=-1)
    return logp.gather(-1, response[0][:, None])[:, 0].numpy()


def perturbed_copy(model, seed: int):
    """The model with N(0, 0.05) noise added to every weight."""
    perturbed = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return perturbed


def named_tensors(model) -> list[tuple[str, torch.Tensor]]:
    return [(name, p.detach().clone()) for name, p in model.named_parameters()]


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_generate_gives_n_answers_with_logprobs(worker):
    prompts = [{"sample_id": "a", "problem": "the red square", "image": _image(1)},
               {"sample_id": "b", "problem": "the blue circle", "image": _image(2)}]
    out = worker.generate(prompts, n=3, max_new_tokens=12)

    assert [o["sample_id"] for o in out] == ["a", "b"]
    for o, p in zip(out, prompts):
        assert o["prompt"] == chat_prompt(p["problem"])
        assert o["weight_version"] == 0
        assert len(o["responses"]) == 3
        for r in o["responses"]:
            assert 1 <= len(r["token_ids"]) <= 12
            assert len(r["logprobs"]) == len(r["token_ids"])
            assert all(np.isfinite(r["logprobs"])) and max(r["logprobs"]) <= 0
            assert r["finish_reason"] in ("stop", "length")
            assert (r["finish_reason"] == "length") == (len(r["token_ids"]) == 12)
            assert isinstance(r["text"], str)
    # The three samples of a prompt are drawn independently (random 1.4k-token vocabulary).
    assert len({tuple(r["token_ids"]) for r in out[0]["responses"]}) > 1


def test_prompt_ids_equal_processor_input_ids(worker, hf, prompt):
    _, processor = hf
    out = worker.generate([prompt], n=1, max_new_tokens=2)[0]
    enc = processor(text=[chat_prompt(prompt["problem"])], images=[prompt["image"]], return_tensors="pt")
    assert out["prompt_ids"] == enc["input_ids"][0].tolist()
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert out["prompt_ids"].count(image_pad) == (IMAGE_SIZE // 28) ** 2  # expanded: 14-px patches, 2x2 merge


def test_prompt_too_long_gets_no_answers_without_failing_the_batch(worker, prompt):
    # One 'x' is one token (no word token holds it): the longest problem that fits leaves room for one token.
    base = len(worker.generate([{**prompt, "problem": "xx"}], n=1, max_new_tokens=1)[0]["prompt_ids"]) - 2
    longest = worker.cfg.rollout.max_model_len - 1 - base
    batch = [prompt, {**prompt, "sample_id": "fits", "problem": "x" * longest},
             {**prompt, "sample_id": "too_long", "problem": "x" * (longest + 1)}]
    out = worker.generate(batch, n=2, max_new_tokens=4)
    assert [o["sample_id"] for o in out] == ["img0", "fits", "too_long"]
    assert [len(o["responses"]) for o in out] == [2, 2, 0]
    assert len(out[1]["prompt_ids"]) == worker.cfg.rollout.max_model_len - 1
    assert [len(r["token_ids"]) for r in out[1]["responses"]] == [1, 1]  # cut at max_model_len
    assert out[2]["prompt_ids"] == []


def test_greedy_is_deterministic(worker, prompt):
    first = worker.generate([prompt], n=1, max_new_tokens=8, greedy=True)[0]["responses"][0]
    again = worker.generate([prompt], n=1, max_new_tokens=8, greedy=True)[0]["responses"][0]
    assert first["token_ids"] == again["token_ids"]
    with pytest.raises(ValueError, match="n must be 1"):
        worker.generate([prompt], n=2, greedy=True)


def test_logprob_parity_with_transformers_on_initial_weights(worker, hf, prompt):
    model, processor = hf
    answer = processor.tokenizer.encode(ANSWER, add_special_tokens=False)
    assert max_diff(worker.probe_logprobs(prompt, answer), hf_logprobs(model, processor, prompt, answer)) < LOGPROB_TOL

    sampled = worker.generate([prompt], n=1, max_new_tokens=24)[0]["responses"][0]
    reference = hf_logprobs(model, processor, prompt, sampled["token_ids"], worker.rule)
    assert max_diff(sampled["logprobs"], reference) < LOGPROB_TOL


def test_sampling_logprobs_are_the_distribution_the_learner_scores(worker, hf, prompt, policy_dir, monkeypatch):
    """At T = 0.5 with min_new_tokens: vLLM's sampling logprobs are those of the processed distribution
    (vision placeholders biased out, end-of-answer suppressed before the minimum, logits / T), which
    policy.sampling.SamplingRule.apply makes of the raw logits on the learner's side; the raw model's
    log-softmax at T = 0.5 is not it. Weights under which the end-of-answer token is likely make the
    suppression count (the random policy gives it ~1e-3)."""
    from policy.sampling import SamplingRule

    model, processor = hf
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    likely_end = copy.deepcopy(model)
    with torch.no_grad():
        likely_end.lm_head.weight[end] += 3 * likely_end.lm_head.weight.std() * torch.sign(
            likely_end.lm_head.weight.mean(0))
    worker.update_weights([named_tensors(likely_end)], version=9)
    rule = SamplingRule.of(worker.tokenizer, policy_dir, temperature=0.5, min_new_tokens=6)
    monkeypatch.setattr(worker, "rule", rule)
    try:
        out = worker.generate([prompt], n=4, max_new_tokens=12, seed=3)[0]["responses"]
        for r in out:
            assert len(r["token_ids"]) >= 6  # no end before the minimum
            assert max_diff(r["logprobs"],
                            hf_logprobs(likely_end, processor, prompt, r["token_ids"], rule)) < LOGPROB_TOL
        raw = SamplingRule(0.5, (), (), 0)  # temperature only: what the learner computed before
        assert max(max_diff(r["logprobs"], hf_logprobs(likely_end, processor, prompt, r["token_ids"], raw))
                   for r in out) > 10 * LOGPROB_TOL
    finally:
        worker.update_weights([named_tensors(model)], version=0)


def test_update_weights_parity_with_perturbed_weights(worker, hf, prompt):
    model, processor = hf
    # The image was encoded with the old weights by the tests above: stale caches would show here.
    worker.generate([prompt], n=1, max_new_tokens=2)
    perturbed = perturbed_copy(model, seed=0)
    tensors = named_tensors(perturbed)
    # Streamed as cluster/weight_sync.py does. Buckets of 7 split decoder layers (q/k/v, gate/up)
    # across buckets: the update must still be whole.
    n_bytes = 0
    for i in range(0, len(tensors), 7):
        n_bytes += worker.load_weights(tensors[i:i + 7])
        with pytest.raises(RuntimeError, match="commit_weights"):
            worker.generate([prompt], n=1)
    assert n_bytes == sum(t.numel() * t.element_size() for _, t in tensors)
    assert worker.commit_weights(version=1) == 1
    assert worker.weight_version == 1
    assert worker.llm.collective_rpc("weight_version") == [1]

    answer = processor.tokenizer.encode(ANSWER, add_special_tokens=False)
    after = hf_logprobs(perturbed, processor, prompt, answer)
    assert max_diff(after, hf_logprobs(model, processor, prompt, answer)) > 0.1  # the update is visible
    assert max_diff(worker.probe_logprobs(prompt, answer), after) < LOGPROB_TOL

    out = worker.generate([prompt], n=2, max_new_tokens=24)[0]
    assert out["weight_version"] == 1
    for r in out["responses"]:
        assert max_diff(r["logprobs"],
                        hf_logprobs(perturbed, processor, prompt, r["token_ids"], worker.rule)) < LOGPROB_TOL


def test_update_changes_generation(worker, hf, prompt, monkeypatch):
    """Weights under which every text position predicts token "7": with o_proj and down_proj zero
    the residual stream at a text position is its embedding, all-ones for every token, so
    logits = lm_head @ rmsnorm(1) = lm_head @ 1, and only row "7" of lm_head is non-zero (logit 128)."""
    model, processor = hf
    seven = processor.tokenizer.convert_tokens_to_ids("7")
    tensors = []
    for name, t in named_tensors(model):
        if name.endswith(("o_proj.weight", "down_proj.weight")) and "language_model" in name:
            t.zero_()
        elif name.endswith(("embed_tokens.weight", "language_model.norm.weight")):
            t.fill_(1.0)
        elif name == "lm_head.weight":
            t.zero_()
            t[seven] = 1.0
        tensors.append((name, t))
    # Through the safetensors-bytes path that an engine in its own processes uses.
    monkeypatch.setattr(worker, "_tensors_by_reference", False)
    worker.update_weights([tensors], version=2)

    out = worker.generate([prompt, {**prompt, "sample_id": "other", "image": _image(3)}], n=3, max_new_tokens=10)
    for o in out:
        assert o["weight_version"] == 2
        for r in o["responses"]:
            assert r["token_ids"] == [seven] * 10
            assert r["text"] == "7" * 10 and r["finish_reason"] == "length"
            assert min(r["logprobs"]) > -1e-6


def test_broadcast_group_update_parity(worker, hf, prompt):
    """rollout.weight_sync=collective's receiving side: the engine joins a gloo broadcast group with a
    sender (learner rank 0's code path, weight_sync/group.py, here in a thread), receives perturbed
    weights in buckets that split decoder layers, and serves exactly them; checksums agree."""
    import socket
    import threading

    from weight_sync.group import WeightGroup

    model, processor = hf
    perturbed = perturbed_copy(model, seed=1)
    tensors = named_tensors(perturbed)
    buckets = [tensors[i:i + 7] for i in range(0, len(tensors), 7)]
    plan = [[(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in b] for b in buckets]
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    sent = []

    def sender():
        group = WeightGroup("127.0.0.1", port, 0, 2, 60, epoch=5, device=torch.device("cpu"))
        sent.extend(group.send(b, bucket) for b, bucket in zip(buckets, plan))

    thread = threading.Thread(target=sender)
    thread.start()
    worker.join_weight_group("127.0.0.1", port, 1, 2, 60, 5)
    assert worker.weight_group_epoch() == 5
    received = worker.receive_weights(plan, version=4)
    thread.join(60)
    assert received == [sent] and len(sent) == len(buckets)
    assert worker.weight_version == 4 and worker.llm.collective_rpc("weight_version") == [4]
    answer = processor.tokenizer.encode(ANSWER, add_special_tokens=False)
    after = hf_logprobs(perturbed, processor, prompt, answer)
    assert max_diff(after, hf_logprobs(model, processor, prompt, answer)) > 0.1
    assert max_diff(worker.probe_logprobs(prompt, answer), after) < LOGPROB_TOL


def test_restoring_checkpoint_weights_restores_logprobs(worker, hf, prompt, policy_dir):
    """Checkpoint names (model.layers.*, visual.*) load as well as transformers' (model.language_model.*)."""
    from safetensors.torch import load_file

    model, processor = hf
    checkpoint = load_file(f"{policy_dir}/model.safetensors")
    assert any(name.startswith("visual.") for name in checkpoint)
    worker.update_weights([list(checkpoint.items())], version=3)
    answer = processor.tokenizer.encode(ANSWER, add_special_tokens=False)
    assert max_diff(worker.probe_logprobs(prompt, answer), hf_logprobs(model, processor, prompt, answer)) < LOGPROB_TOL
    assert worker.generate([prompt], n=1, max_new_tokens=4)[0]["weight_version"] == 3
