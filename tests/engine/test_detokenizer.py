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


# DeepSeek's structure markers as a checkpoint may mark them (V3.2's tokenizer.json marks ｜DSML｜ special).
STRUCTURE = ["<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>",
             "<｜tool▁calls▁end｜>", "｜DSML｜", "</think>"]


def _special_markers_tokenizer(folder):
    """The byte-level tokenizer with the tool markers, ｜DSML｜ and </think> added as special tokens."""
    import json

    from tokenizers import AddedToken

    from dsserve.assets.tiny_random import byte_level_tokenizer

    hf = byte_level_tokenizer()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in STRUCTURE])
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<｜begin▁of▁sentence｜>",
                                                              "eos_token": "<｜end▁of▁sentence｜>"}))
    return Tokenizer(folder)


def test_special_structure_markers_survive_skip_special_tokens(tmp_path):
    """A tool call written with special marker tokens reaches the tool parser whole; BOS and EOS are still skipped."""
    from dsserve.tool_parsers import FORMATS

    tokenizer = _special_markers_tokenizer(tmp_path)
    assert all(tokenizer.token_to_id(t) is not None for t in STRUCTURE)
    answer = ('</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}'
              '<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
    ids = tokenizer.encode(answer, add_special_tokens=False)
    assert tokenizer.token_to_id("<｜tool▁sep｜>") in ids  # the marker is one (special) token
    eos = tokenizer.token_to_id("<｜end▁of▁sentence｜>")
    detok = IncrementalDetokenizer(tokenizer, [0], skip_special_tokens=True, stop=[])
    for token in ids + [eos]:
        detok.append(token)
    assert detok.visible_text(finished=True) == answer  # EOS skipped, every marker kept
    parsed = FORMATS["deepseek_v31"].parse(detok.text.split("</think>", 1)[1])
    assert [(c.name, c.arguments) for c in parsed.calls] == [("get_weather", '{"city": "Paris"}')]
    dsml = '\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n</｜DSML｜invoke>\n</｜DSML｜function_calls>'
    assert tokenizer.decode(tokenizer.encode(dsml, add_special_tokens=False) + [eos]) == dsml
    assert tokenizer.decode([0, *tokenizer.encode("hi", add_special_tokens=False)]) == "hi"  # BOS skipped
