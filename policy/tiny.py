"""Builds the tiny embedded Qwen2.5-VL policy: a real HF directory that vLLM and transformers load.

Nothing is downloaded: the tokenizer is byte-level (every UTF-8 byte is a token, so any text round-trips)
with Qwen's special tokens, plus whole-number tokens 0..1023 and the Seg-Zero tags as single tokens, so
a coordinate is one token and the tiny model can learn positions as a classification, plus the words of
the Seg-Zero prompt, the synthetic queries and the answer JSON's keys as single tokens (``WORD_TOKENS``),
as a real BPE vocabulary would have them: the prompt is ~140 tokens instead of ~590 bytes and an answer
~23 instead of ~70, which makes every rollout and learner step several times cheaper. The weights are
random (seeded); the warm start (train.sft_steps) teaches the answer format.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from data.position_code import AMPLITUDE, FREQUENCIES, barcode_basis, fourier_code
from data.synthetic import COLOURS, DIRECTIONS, EXTREMES, SHAPES
from policy.prompt import EXAMPLE_ANSWER, SEGZERO_TEMPLATE, SYSTEM_PROMPT

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
SEGZERO_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
NUMBER_TOKENS = [str(i) for i in range(1024)]


def _word_tokens() -> list[str]:
    """Words (with and without their leading space) of the system prompt, the Seg-Zero template and the
    synthetic queries, and the fixed pieces of the answer JSON (data/segzero.answer_json)."""
    template = SEGZERO_TEMPLATE.replace("{coordinates}", "")  # the pixel prompt's words only
    vocabulary = " ".join([SYSTEM_PROMPT, template, EXAMPLE_ANSWER, *COLOURS, *SHAPES, *DIRECTIONS,
                           *EXTREMES, "the shape largest smallest system user assistant"])
    words = sorted({w.strip() for w in re.findall(r" ?[A-Za-z_]+", vocabulary)})
    answer_pieces = ['{"bbox":[', '],"points_1":[', '],"points_2":[', ']}']
    return answer_pieces + [form for w in words for form in (w, " " + w)]


WORD_TOKENS = _word_tokens()
# VisionReasoner's prompt and answer list (reward.rules=multi_object) and the multi-object queries: added
# after WORD_TOKENS so that no earlier token id moves and the vocabulary stays within its padded size
# (the same random weights for the same seed).
MULTI_OBJECT_WORD_TOKENS = ['[{"bbox_2d":[', '],"point_2d":[', ']},{"bbox_2d":[', ']}]'] + [
    form for w in ("all", "bboxs", "point", "shapes", "squares", "triangles") for form in (w, " " + w)]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' or 'image' in c %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(QWEN_SPECIAL_TOKENS)
    tok.add_tokens(SEGZERO_TAGS + NUMBER_TOKENS)
    tok.add_tokens(WORD_TOKENS)  # after the numbers: number token ids do not depend on the word list
    tok.add_tokens(MULTI_OBJECT_WORD_TOKENS)
    return tok


def number_code_rows(count: int, image_size: int, amplitude: float = 0.06):
    """Fourier code of the integers 0..count-1: row n = amplitude * fourier_code(n) (data/position_code.py:
    [cos(w_k n), sin(w_k n)]_k, K = FREQUENCIES, periods geometric from 6 px to 4 * image_size).

    Used as the start of both the input and the output embedding of number token n (its first 2K dims):
    the logit of number n for a hidden state equal to the code of m is amplitude^2 * sum_k cos(w_k (n - m)),
    peaked at n = m, so copying or nudging a coordinate is easy to learn. The image tokens carry the same
    code of their cell's centre (``init_position_reader``). The amplitude matches the norm of HF's random
    rows (std 0.02) for hidden 128.
    """
    import torch

    code = fourier_code(range(count), FREQUENCIES, image_size)
    return amplitude * torch.tensor(code, dtype=torch.float32)


def init_position_reader(model, merger_gain: float = 0.12) -> None:
    """Sets the vision tower so that image token i's first 4K dims are the code of its cell's centre.

    The synthetic images carry that code in barcodes (data/position_code.py): pixels = 128 + A * Q f.
    1. patch embedding, out dims d < 4K: weight = Q[:, d] * 255 * std_c / (2 A) on the barcode pixels of
       both temporal copies, 0 elsewhere; with the processor's x = (p / 255 - mean_c) / std_c this gives
       sum = Q^T (p - 255 mean) / A = f_d, because Q is orthogonal to each channel's constant.
    2. vision blocks: their attention and MLP outputs skip dims < 4K, so the residual stream keeps f.
    3. merger (RMSNorm, Linear, GELU, Linear over the 2x2 patches): the first patch's dims < 4K go
       through as z -> GELU(z + 4) - 4 ~ z (|z| < 2), into the token's dims < 4K; the rest stay random and
       do not write there. The RMSNorm scales f per token, which keeps its direction.
    4. the cell's colour (``init_colour_reader``).
    Everything else keeps its random start; all of it trains.
    """
    import torch
    from transformers.image_utils import OPENAI_CLIP_STD

    n = 4 * FREQUENCIES
    visual = model.model.visual
    if visual.config.hidden_size < n + 16:
        raise ValueError(f"the position reader needs vision_hidden_size >= {n + 16}, got {visual.config.hidden_size}")
    q = torch.tensor(barcode_basis(FREQUENCIES), dtype=torch.float32)  # (rows, 14, 3, n)
    rows = q.shape[0]
    with torch.no_grad():
        weight = visual.patch_embed.proj.weight  # (hidden, 3, T, 14, 14)
        weight[:n] = 0
        for c in range(3):
            read = q[:, :, c, :].permute(2, 0, 1) * (255 * OPENAI_CLIP_STD[c] / (2 * AMPLITUDE))
            weight[:n, c, :, :rows, :] = read[:, None]
        for block in visual.blocks:
            for out in (block.attn.proj, block.mlp.down_proj):
                out.weight[:n] = 0
                out.bias[:n] = 0
        first, last = visual.merger.mlp[0], visual.merger.mlp[2]
        first.weight[:n] = 0
        first.weight[:n, :n] = torch.eye(n)
        first.bias[:n] = 4.0
        last.weight[:, :n] = 0
        last.weight[:n] = 0
        last.weight[:n, :n] = merger_gain * torch.eye(n)
        last.bias[:n] = -4.0 * merger_gain
        # dim n: a constant "this is an image token" marker, what the retrieval head looks for
        last.weight[n] = 0
        last.bias[n] = IMAGE_MARKER
    init_colour_reader(model, n)


IMAGE_MARKER = 1.0
# Language-model dims of the grounding circuit, after the 4K code dims (n) and the image marker (dim n):
COLOUR_WORD = 1      # n+1, n+2: a colour word's template (``colour_templates``), set in its input embedding
COLOUR_WORD_MARKER = 3  # n+3: "this token names a colour", what the gather head looks for
WANTED = 4           # n+4, n+5: the colour the query asks for, gathered into every position
CHROMA = 6           # n+6, n+7: an image token's colour at its cell's centre
CHROMA_BASIS = np.array([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0]]) / np.array([[2 ** 0.5], [6 ** 0.5]])


def chroma(rgb) -> np.ndarray:
    """The colour of an RGB triple (0..255) without its grey part: 2 numbers, 0 for any grey."""
    return CHROMA_BASIS @ np.asarray(rgb, dtype=np.float64) / 255


def colour_templates() -> dict[str, np.ndarray]:
    """For each palette colour c, the unit vector w of the chroma plane that tells c best from the other
    palette colours and from grey: the w with the largest min_d w . (chroma(c) - chroma(d)) (d: the
    other colours and grey). The palette's colours are not orthogonal (red and yellow share a lot), so
    w is not chroma(c) itself."""
    angles = np.linspace(0, 2 * np.pi, 3600, endpoint=False)
    w = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    points = {c: chroma(rgb) for c, rgb in COLOURS.items()}
    out = {}
    for c, u in points.items():
        margin = np.min([w @ (u - v) for d, v in points.items() if d != c] + [w @ u], axis=0)
        out[c] = w[int(margin.argmax())]
    return out


def init_colour_reader(model, dim: int, merger_gain: float = 0.5) -> None:
    """Vision side of the grounding circuit: image token dims n+6, n+7 (``CHROMA``) carry the chroma of
    its cell's centre.

    A synthetic shape is centred on its cell's centre (the corner shared by the cell's four patches) and
    is at least 6 px in half-extent, so the 2 x 2 pixels at the bottom-right of the cell's top-left patch
    are always inside the shape: reading only them gives the shape's colour however little of the cell
    it covers (a whole-patch mean would mix in the background). Patch-embedding dims ``dim``, ``dim`` + 1
    read those pixels' chroma (``CHROMA_BASIS``), the vision blocks do not write there, and the merger
    passes the top-left patch's two dims through (GELU in its linear range, as the position code).
    """
    import torch
    from transformers.image_utils import OPENAI_CLIP_STD

    visual = model.model.visual
    n = 4 * FREQUENCIES
    out = n + CHROMA
    with torch.no_grad():
        weight = visual.patch_embed.proj.weight  # (hidden, 3, T, 14, 14)
        temporal = weight.shape[2]
        weight[dim:dim + 2] = 0
        for j in range(2):
            for c in range(3):
                # x = (p / 255 - mean_c) / std_c: the sum over 4 pixels x T copies is chroma_j minus a constant
                weight[dim + j, c, :, -2:, -2:] = CHROMA_BASIS[j, c] * OPENAI_CLIP_STD[c] / (4 * temporal)
        for block in visual.blocks:
            for proj in (block.attn.proj, block.mlp.down_proj):
                proj.weight[dim:dim + 2] = 0
                proj.bias[dim:dim + 2] = 0
        first, last = visual.merger.mlp[0], visual.merger.mlp[2]
        first.weight[dim:dim + 2] = 0
        first.weight[dim:dim + 2, dim:dim + 2] = torch.eye(2)  # merger input dims < hidden: the top-left patch
        first.bias[dim:dim + 2] = 4.0
        last.weight[:, dim:dim + 2] = 0
        last.weight[n + 1:n + 8] = 0
        last.bias[n + 1:n + 8] = 0
        last.weight[out:out + 2, dim:dim + 2] = merger_gain * torch.eye(2)
        last.bias[out:out + 2] = -4.0 * merger_gain


def init_grounding_heads(model, n: int, colour_ids: dict[str, list[int]], word_scale: float = 0.3,
                         gather_gap: float = 12.0, gather_gain: float = 0.07, select_gain: float = 3.0,
                         logit_gap: float = 12.0, copy_gain: float = 1.0) -> None:
    """Language side of the grounding circuit: the answer's coordinate tokens start out reading the code
    of the image token whose colour the query names.

    1. The colour words' input embeddings ("red", " red", ...) hold their colour's template
       (``colour_templates``) in dims n+1, n+2 and a marker in dim n+3; every other token holds 0 there.
    2. Decoder layer 0, head 0 *gathers*: its query is a bias and its key the colour-word marker, so every
       position attends to the colour words before it (the query's, then the answer's own think); value/
       output copy the template into dims n+4, n+5 (``WANTED``).
    3. Decoder layer 1, head 0 *retrieves*: key = the image marker (every image token, over text) plus
       the token's chroma; query = a bias on the marker plus the wanted template. So the attention logit
       of image token i is gap + select_gain-scaled w_wanted . chroma_i: the named colour's token wins,
       and with the query naming no colour (or two shapes of one colour) the attention spreads over the
       image. Value/output copy the position code (dims < n) of the tokens it attends to.
    Every query/key dim used sits in the lowest-frequency rotary pairs, which M-RoPE leaves unrotated
    (~1e-3 rad over a 1k-token context), so none of it depends on distance. All of it trains; which
    shape (colour and kind) and how big are still learned.
    """
    import torch

    layers = model.model.language_model.layers
    if len(layers) < 2:
        raise ValueError("the grounding circuit needs a policy of at least 2 decoder layers")
    h = layers[0].self_attn.head_dim
    if n > h:
        raise ValueError(f"the retrieval head copies {n} dims, head_dim is {h}")
    hidden = model.config.text_config.hidden_size
    marker, sel = h - 1, [h - 3, h - 2]
    templates = colour_templates()
    word, word_marker = [n + COLOUR_WORD, n + COLOUR_WORD + 1], n + COLOUR_WORD_MARKER
    wanted, chroma_dims = [n + WANTED, n + WANTED + 1], [n + CHROMA, n + CHROMA + 1]
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[:, n + 1:n + 8] = 0
        for colour, ids in colour_ids.items():
            for i in ids:
                embed[i, word] = word_scale * torch.tensor(templates[colour], dtype=embed.dtype)
                embed[i, word_marker] = word_scale
        for layer in layers[:2]:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.weight[:h] = 0
                proj.bias[:h] = 0
            attn.o_proj.weight[:, :h] = 0
            attn.q_proj.bias[marker] = 1.0
        # a normalised embedding dim is ~sqrt(hidden) x its share of the token's norm
        gather = layers[0].self_attn
        gather.k_proj.weight[marker, word_marker] = gather_gap * h ** 0.5 / (hidden ** 0.5 * 0.5)
        for j in range(2):
            gather.v_proj.weight[j, word[j]] = 1.0
            gather.o_proj.weight[wanted[j], j] = gather_gain
        retrieve = layers[1].self_attn
        retrieve.k_proj.weight[marker, n] = logit_gap * h ** 0.5 / (hidden ** 0.5 * 0.7)
        for j in range(2):
            retrieve.q_proj.weight[sel[j], wanted[j]] = select_gain
            retrieve.k_proj.weight[sel[j], chroma_dims[j]] = select_gain
        retrieve.v_proj.weight[:n, :n] = copy_gain * torch.eye(n)
        retrieve.o_proj.weight[:n, :n] = torch.eye(n)


def build_tiny_policy(out_dir: str | Path, *, image_size: int = 112, hidden_size: int = 128,
                      layers: int = 2, heads: int = 2, vision_hidden_size: int = 64,
                      vision_layers: int = 1, seed: int = 0, number_code: bool = False,
                      position_reader: bool = False, intermediate_size: int | None = None,
                      kv_heads: int | None = None, vocab_size: int | None = None) -> Path:
    """Writes config, random weights (safetensors), tokenizer, processor and chat template to out_dir.

    number_code: initialise the number tokens' input and output embeddings with a Fourier code of their
    value (``number_code_rows``) instead of noise, so that nearby numbers start out similar.
    position_reader: initialise the vision tower to read the synthetic images' position barcodes and
    each cell's colour (``init_position_reader``), and two attention heads as a grounding circuit from
    the query's colour word to the position of the shape of that colour (``init_grounding_heads``);
    needs vision_hidden_size >= 80 and layers >= 2.
    intermediate_size, kv_heads: the MLP width (default 2 x hidden_size) and key/value heads (default
    ``heads``), for policies shaped like a real Qwen2.5-VL (benchmarks/weight_sync.py).
    vocab_size: embedding and LM-head rows (at least the tokenizer's), e.g. Qwen's 151,936, for the
    learner's cost at a real vocabulary (benchmarks/learner_step.py --vocab); the extra rows are never
    produced by the tokenizer.
    Idempotent: an existing complete directory built with the same settings is reused.
    """
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    settings = dict(image_size=image_size, hidden_size=hidden_size, layers=layers, heads=heads,
                    vision_hidden_size=vision_hidden_size, vision_layers=vision_layers, seed=seed)
    if number_code:  # only when set, so directories built before the option existed stay valid
        settings["number_code"] = True
    if position_reader:
        settings["position_reader"] = 2  # 2: with the colour grounding heads (older directories are rebuilt)
    if intermediate_size or kv_heads:
        settings.update(intermediate_size=intermediate_size, kv_heads=kv_heads)
    if vocab_size:
        settings["vocab_size"] = vocab_size
    marker = out / "tiny_policy.json"
    if marker.exists() and json.loads(marker.read_text()) == settings and (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)

    backend = _byte_level_tokenizer()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=32768, clean_up_tokenization_spaces=False)
    ids = {t: backend.token_to_id(t) for t in QWEN_SPECIAL_TOKENS}
    rows = (backend.get_vocab_size() + 63) // 64 * 64
    if vocab_size is not None and vocab_size < rows:
        raise ValueError(f"vocab_size={vocab_size} is below the tokenizer's {rows} rows")
    config = tiny_config(ids, vocab_size or rows, hidden_size, layers, heads,
                         vision_hidden_size, vision_layers, intermediate_size, kv_heads)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    if number_code:
        init_number_code(model, backend, image_size)
    if position_reader:
        init_position_reader(model)
        colour_ids = {c: [backend.token_to_id(w) for w in (c, " " + c)] for c in COLOURS}
        init_grounding_heads(model, 4 * FREQUENCIES, colour_ids)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out, safe_serialization=True)

    save_processor(out, tokenizer, image_size)
    marker.write_text(json.dumps(settings))
    return out


def save_processor(out: Path, tokenizer, image_size: int) -> None:
    """The processor (image and video processors at a fixed size, the chat template) and the tokenizer."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    pixels = image_size * image_size  # min = max: the processor never resizes our pre-resized images
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=14,
                                            merge_size=2, temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(min_pixels=pixels, max_pixels=pixels)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)


def tiny_config(ids: dict, vocab_size: int, hidden_size: int, layers: int, heads: int, vision_hidden_size: int,
                vision_layers: int, intermediate_size: int | None, kv_heads: int | None):
    """The Qwen2.5-VL config of the tiny policy (``ids``: the special tokens' ids)."""
    from transformers import Qwen2_5_VLConfig

    # mrope splits head_dim/2 rotary frequencies over (time, height, width); Qwen uses 1:1.5:1.5.
    half = hidden_size // heads // 2
    hw = (half * 3 // 8)
    mrope_section = [half - 2 * hw, hw, hw]
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size or hidden_size * 2,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
            max_position_embeddings=4096, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=vision_layers, hidden_size=vision_hidden_size, intermediate_size=vision_hidden_size * 2,
            num_heads=1, out_hidden_size=hidden_size, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=112, fullatt_block_indexes=[vision_layers - 1],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def init_number_code(model, backend, image_size: int) -> None:
    """The number tokens' input and output embeddings start from a Fourier code of their value
    (``number_code_rows``) plus half their noise, so that nearby numbers start out similar."""
    import torch

    # "0".."9" are byte tokens already, "10".."1023" added ones: look every id up, not a range
    number_ids = torch.tensor([backend.token_to_id(t) for t in NUMBER_TOKENS])
    code = number_code_rows(len(NUMBER_TOKENS), image_size)
    with torch.no_grad():
        for table in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            rows = table[number_ids] * 0.5
            rows[:, :code.shape[1]] += code
            table[number_ids] = rows
