"""Logprobs from the final hidden states in chunks (learner.logprob_chunk_tokens, learner/logprobs.py): the
same logprobs, entropies and parameter gradients as the whole-vocabulary logits, and no tensor of the
whole micro-batch's logits kept for backward."""
import pytest
import torch

from config import Config
from learner.batch import collate
from learner.forward import Forward
from policy.sampling import SamplingRule
from policy.tiny import build_tiny_policy
from tests.test_learner import grouped_samples


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = build_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny")
    torch.manual_seed(0)
    return str(path), AutoModelForImageTextToText.from_pretrained(str(path)), AutoProcessor.from_pretrained(str(path))


def forward_for(policy_path: str, processor, chunk_tokens: int, shared_prompt: bool) -> Forward:
    cfg = Config()
    cfg.learner.logprob_chunk_tokens, cfg.learner.shared_prompt = chunk_tokens, shared_prompt
    # T != 1, stop tokens suppressed for the first 3 positions, vision tokens banned: every processing step
    rule = SamplingRule.of(processor.tokenizer, policy_path, temperature=0.7, min_new_tokens=3)
    return Forward(cfg, torch.device("cpu"), torch.float32, rule)


def run(model, forward: Forward, batch: dict, sampled: bool) -> tuple:
    """logp, entropy and every parameter's gradient of a loss that uses both."""
    model.zero_grad()
    features = forward.features(model, batch, {})
    logp, entropy = forward.logprobs(model, batch, features, with_entropy=True, sampled=sampled)
    weights = torch.linspace(-1, 1, logp.numel()).view_as(logp) * batch["response_mask"]
    ((logp * weights).sum() + 0.3 * (entropy * batch["response_mask"]).sum()).backward()
    return logp.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None}


@pytest.mark.parametrize("shared_prompt", [True, False])
@pytest.mark.parametrize("sampled", [True, False])
def test_chunked_logprobs_entropy_and_gradients_equal_the_whole_vocabulary_path(policy, shared_prompt, sampled):
    path, model, processor = policy
    samples, _ = grouped_samples()
    batch = collate(processor, samples, processor.tokenizer.pad_token_id)
    B, R = batch["response_ids"].shape
    assert R > 4  # chunks of 1 row-position (chunk_tokens < B), of a few positions, and one chunk
    reference = run(model, forward_for(path, processor, 0, shared_prompt), batch, sampled)
    # the entropy's gradient stays finite where min_new_tokens puts the stop tokens at -inf
    assert all(torch.isfinite(g).all() for g in reference[2].values())
    for chunk_tokens in (1, 2 * B, 1024):
        logp, entropy, grads = run(model, forward_for(path, processor, chunk_tokens, shared_prompt), batch, sampled)
        torch.testing.assert_close(logp, reference[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(entropy, reference[1], rtol=0, atol=1e-5)
        assert grads.keys() == reference[2].keys() and "lm_head.weight" in grads
        for name, g in grads.items():
            scale = reference[2][name].abs().max().item()
            assert (g - reference[2][name]).abs().max().item() <= 1e-5 * max(scale, 1.0), (chunk_tokens, name)


def test_no_tensor_of_the_whole_logits_is_kept_for_backward(policy):
    """Vocabulary-sized tensors autograd keeps for backward: none with chunks (each chunk's logits are
    recomputed in backward), at least the whole micro-batch's logits without."""
    path, model, processor = policy
    samples, _ = grouped_samples()
    batch = collate(processor, samples, processor.tokenizer.pad_token_id)
    B, R = batch["response_ids"].shape
    V = model.config.text_config.vocab_size

    def vocabulary_sized_saved(chunk_tokens: int) -> int:
        forward = forward_for(path, processor, chunk_tokens, shared_prompt=True)
        saved = []

        def pack(t):
            if t.dim() >= 2 and t.shape[-1] == V:
                saved.append(t.numel())
            return t

        features = forward.features(model, batch, {})
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logp, _ = forward.logprobs(model, batch, features, with_entropy=True)
        assert logp.requires_grad
        return sum(saved)

    assert vocabulary_sized_saved(0) >= B * R * V
    assert vocabulary_sized_saved(2 * B) == 0


def test_an_lm_head_with_a_bias_gives_the_same_numbers_and_gradients():
    """head_logprobs on a plain linear head with a bias (Qwen's have none), against autograd through it."""
    from learner.logprobs import head_logprobs, token_logprobs

    torch.manual_seed(3)
    head = torch.nn.Linear(16, 50)
    rule = SamplingRule(temperature=0.8, banned_ids=(3, 7), stop_ids=(1,), min_new_tokens=2)
    hidden = torch.randn(3, 6, 16, requires_grad=True)
    targets = torch.randint(8, 50, (3, 5))
    results = []
    for chunked in (False, True):
        head.zero_grad()
        hidden.grad = None
        if chunked:
            logp, entropy = head_logprobs(hidden, head, targets, rule, with_entropy=True, chunk_tokens=6)
        else:
            logp, entropy = token_logprobs(head(hidden), targets, rule, with_entropy=True)
        (logp.sum() * 0.7 + (entropy * torch.linspace(-1, 1, 5)).sum()).backward()
        results.append((logp.detach(), entropy.detach(), hidden.grad.clone(), head.weight.grad.clone(),
                        head.bias.grad.clone()))
    for whole, chunked in zip(*results):
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
