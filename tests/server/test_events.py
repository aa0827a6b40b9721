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
