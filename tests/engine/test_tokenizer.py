import pytest

from dsserve.engine.tokenizer import Tokenizer
from dsserve.errors import ConfigError, InvalidRequestError

BOS = "<｜begin▁of▁sentence｜>"


@pytest.fixture(scope="module")
def tokenizer(tiny_r1):
    return Tokenizer(tiny_r1)


def test_r1_generation_prompt(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == f"{BOS}<｜User｜>Hi<｜Assistant｜><think>\n"
    ids = tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids.count(tokenizer.bos_token_id) == 1  # no double BOS


def test_r1_strips_earlier_reasoning_and_joins_system(tokenizer):
    messages = [
        {"role": "system", "content": "S1"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4", "tool_calls": None},
        {"role": "system", "content": "S2"},
        {"role": "user", "content": "and 3+3?"},
    ]
    text = tokenizer.apply_chat_template(messages)
    assert text == (f"{BOS}S1\n\nS2<｜User｜>2+2?<｜Assistant｜>\n\n4<｜end▁of▁sentence｜>"
                    "<｜User｜>and 3+3?<｜Assistant｜><think>\n")


def test_template_errors_are_request_errors(tokenizer):
    bad = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], chat_template=bad)


def test_chat_template_jinja_file_wins(tiny_r1, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_r1 / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer.json is missing"):
        Tokenizer(tmp_path)
