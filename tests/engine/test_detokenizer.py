import pytest

from dsserve.engine.detokenizer import IncrementalDetokenizer
from dsserve.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_r1):
    return Tokenizer(tiny_r1)


@pytest.mark.parametrize("text", [
    pytest.param("你好，世界！", id="chinese"),
    pytest.param("9.11 和 9.8 哪个大？答案是 9.8", id="mixed"),
    pytest.param("héllo wörld ñ", id="latin"),
    pytest.param("emoji 🙂👍🏽 end", id="emoji"),
])
def test_utf8_never_broken(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # byte-level: multi-byte characters span several tokens
    detok = IncrementalDetokenizer(tokenizer, [0], skip_special_tokens=True, stop=[])
    shown = []
    for token in ids:
        before = detok.text
        detok.append(token)
        shown.append(detok.text[len(before):])
    assert all("\ufffd" not in piece for piece in shown)
    assert "".join(shown) == text == detok.visible_text(finished=True)


@pytest.mark.parametrize("text,stop,expected", [
    pytest.param("The answer is 42.\n\nDone", ["\n\n"], "The answer is 42.", id="newlines"),
    pytest.param("答案是 B。然后", ["。"], "答案是 B", id="chinese-stop"),
    pytest.param("abc</think>xyz", ["</think>"], "abc", id="multi-token-stop"),
    pytest.param("no stop here", ["zzz"], "no stop here", id="absent"),
    pytest.param("a-b-c", ["c", "-"], "a", id="first-occurrence-wins"),
])
def test_stop_strings_cut_exactly(tokenizer, text, stop, expected):
    detok = IncrementalDetokenizer(tokenizer, [0], skip_special_tokens=True, stop=stop)
    visible = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        hit = detok.append(token)
        visible.append(detok.visible_text(finished=hit is not None))
        if hit:
            break
    assert detok.visible_text(finished=True) == expected
    assert all(not any(s in v for s in stop) for v in visible)


def test_special_tokens_skipped_and_markers_kept(tokenizer):
    ids = tokenizer.encode("<think>\nhm\n</think>\n\nok", add_special_tokens=True)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids + [tokenizer.eos_token_id]) == "<think>\nhm\n</think>\n\nok"
