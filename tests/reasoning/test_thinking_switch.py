"""R1's reasoning split when the prompt does or does not open the reasoning: streamed equals whole, at every cut."""

import pytest

from dsserve.reasoning import r1

CASES = [
    # starts_in_reasoning, output, (reasoning, content)
    pytest.param(True, "step one</think>\n\nanswer", ("step one", "\n\nanswer"), id="open-prompt"),
    pytest.param(True, "still thinking", ("still thinking", None), id="open-prompt-cut"),
    pytest.param(False, "answer only, no tags", (None, "answer only, no tags"), id="thinking-off"),
    pytest.param(False, "  \n<think>\nhmm</think>\n\nok", ("\nhmm", "\n\nok"), id="thinking-off-model-opens-think"),
    pytest.param(False, "an answer with </think> inside", (None, "an answer with </think> inside"),
                 id="thinking-off-closing-tag-is-content"),
    pytest.param(False, "<thi", (None, "<thi"), id="thinking-off-partial-tag-at-the-end"),
    pytest.param(False, "", (None, None), id="empty"),
]


@pytest.mark.parametrize("starts,text,expected", CASES)
def test_split(starts, text, expected):
    assert r1.split(text, starts) == expected


@pytest.mark.parametrize("starts,text,expected", CASES)
def test_streamed_equals_whole_at_every_cut(starts, text, expected):
    for cut in range(len(text) + 1):
        stream = r1.ReasoningStream(starts)
        parts = [stream.update(text[:cut], False), stream.update(text, True)]
        reasoning = "".join(p[0] for p in parts) or None
        content = "".join(p[1] for p in parts) or None
        assert (reasoning, content) == expected, cut


def test_prompt_opens_and_close_reasoning():
    assert r1.prompt_opens_reasoning("<｜Assistant｜><think>\n")
    assert not r1.prompt_opens_reasoning("<｜Assistant｜></think>")
    closed = r1.close_reasoning("<｜Assistant｜><think>\n")
    assert closed == "<｜Assistant｜><think>\n\n</think>\n\n" and not r1.prompt_opens_reasoning(closed)
    assert r1.close_reasoning("<｜Assistant｜>") == "<｜Assistant｜><think>\n\n</think>\n\n"
