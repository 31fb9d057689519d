"""The tiny policy's tokenizer: bytes + numbers + the prompt's words, and every text still round-trips."""
import pytest

from data.segzero import reference_answer
from policy.prompt import chat_prompt
from policy.tiny import _byte_level_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return _byte_level_tokenizer()


def test_prompt_and_answer_are_word_tokens_and_round_trip(tokenizer):
    prompt = chat_prompt("the purple triangle")
    answer = reference_answer("the purple triangle", [3, 31, 25, 53], [[14, 42], [9, 40]], "purple triangle")
    for text, most in ((prompt, len(prompt) // 3), (answer, 25)):
        ids = tokenizer.encode(text).ids
        assert len(ids) <= most, (len(ids), tokenizer.encode(text).tokens)
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    tokens = tokenizer.encode(answer).tokens
    assert [t for t in tokens if t.isdigit()] == ["3", "31", "25", "53", "14", "42", "9", "40"]


def test_multi_object_prompt_and_answer_are_word_tokens(tokenizer):
    prompt = chat_prompt("all the red shapes", "multi_object")
    objects = [{"bbox_2d": [3, 31, 25, 53], "point_2d": [14, 42]}, {"bbox_2d": [60, 2, 80, 20], "point_2d": [70, 11]}]
    answer = reference_answer("all the red shapes", [3, 2, 80, 53], [[14, 42], [70, 11]], "red circle red square",
                              objects)
    assert answer.endswith('<answer>[{"bbox_2d":[3,31,25,53],"point_2d":[14,42]},'
                           '{"bbox_2d":[60,2,80,20],"point_2d":[70,11]}]</answer>')
    for text, most in ((prompt, len(prompt) // 3), (answer, 33)):  # 13 pieces + 12 numbers + think
        ids = tokenizer.encode(text).ids
        assert len(ids) <= most, (len(ids), tokenizer.encode(text).tokens)
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("text", ["other thinking, The themes", "0 999 1023 1024", "ünïcødé → 形", "bboxes"])
def test_any_text_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text


def test_every_coordinate_is_one_token(tokenizer):
    for n in range(1024):
        assert len(tokenizer.encode(str(n)).ids) == 1
