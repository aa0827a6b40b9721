"""EventWriter: each SSE event is the whole chunk object, its fixed fields encoded once per stream."""

import json

from dsserve.server.common import EventWriter


def _parse(event: bytes) -> dict:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    return json.loads(event[6:])


def test_events_are_complete_chunks_with_usage_null_until_the_last():
    head = {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m\u00e9/\"x\""}
    events = EventWriter(head, include_usage=True)
    choice = {"index": 0, "text": "caf\u00e9 \"q\"\n\U0001F600", "logprobs": None, "finish_reason": None}
    assert _parse(events.event(choice)) == {**head, "choices": [choice], "usage": None}
    assert "caf\u00e9".encode() in events.event(choice)  # UTF-8 on the wire, not \u escapes (as before)
    two = _parse(events.event(choice, {**choice, "index": 1}))
    assert [c["index"] for c in two["choices"]] == [0, 1]
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert _parse(events.usage_event(usage)) == {**head, "choices": [], "usage": usage}


def test_without_usage_the_field_is_absent():
    events = EventWriter({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                          "system_fingerprint": None}, include_usage=False)
    body = _parse(events.event({"index": 0, "delta": {"content": "hi"}, "logprobs": None, "finish_reason": None}))
    assert "usage" not in body and body["system_fingerprint"] is None
    assert _parse(EventWriter.error_event({"error": {"message": "boom"}})) == {"error": {"message": "boom"}}
    assert events.done == b"data: [DONE]\n\n"


def test_the_per_token_choices_are_byte_for_byte_the_encoded_dicts():
    """Completion and chat chunks without logprobs are formatted around one JSON string, not encoded from a dict:
    the bytes must be the same as the dict's, for any text."""
    from dsserve.server.chat import _DELTA
    from dsserve.server.common import json_string
    from dsserve.server.completions import _TEXT_CHOICE

    events = EventWriter({"id": "x", "object": "text_completion", "created": 1, "model": "m"}, include_usage=True)
    for text in ("", "plain", "caf\u00e9 \"q\" \\ / \n\t\r\b\f \x00\x1f \u2028 \U0001F600", "\ud800"):
        for finish in (None, "length", "stop"):
            choice = {"index": 3, "text": text, "logprobs": None, "finish_reason": finish}
            fast = _TEXT_CHOICE % (3, json_string(text), json_string(finish) if finish else "null")
            assert fast == json.dumps(choice, ensure_ascii=False, separators=(",", ":"))
            if text != "\ud800":  # a lone surrogate has no UTF-8 either way
                assert events.encoded(fast) == events.event(choice)
        for key in ("content", "reasoning_content"):
            choice = {"index": 1, "delta": {key: text}, "logprobs": None, "finish_reason": None}
            fast = _DELTA % (1, key, json_string(text))
            assert fast == json.dumps(choice, ensure_ascii=False, separators=(",", ":"))
