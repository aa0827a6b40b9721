"""DeepSeek-R1's `<think>...</think>` format, streamed or not, with the same result either way.

R1 writes `<think>\\n...reasoning...\\n</think>\\n\\nanswer`. Since the 2025-02 template the prompt already ends
with `<think>\\n`, so the output starts inside the reasoning and has only the closing tag. The rule (as
vLLM's deepseek_r1 parser): drop an opening `<think>`; everything before `</think>` is reasoning, everything
after is content; without `</think>` (still thinking, or cut by max_tokens) all of it is reasoning.

A prompt that does not end inside an open `<think>` (thinking switched off: V3.1's template ends it with
`</think>`; R1-0528's ends at `<｜Assistant｜>`) starts the output in the answer: then the output is all content
unless it opens with `<think>` itself.

Streaming applies the same split to the cumulative text and emits the growth of each part, holding back a
tail that could still become a tag, so concatenated deltas equal the non-streamed split exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

START, END = "<think>", "</think>"


def split(text: str, starts_in_reasoning: bool = True) -> tuple[str | None, str | None]:
    """Whole output -> (reasoning_content, content); None where a part is absent (as DeepSeek's API)."""
    if not starts_in_reasoning:
        opened = text.lstrip()
        if not opened.startswith(START):
            return None, (text or None)
        text = opened
    if START in text:
        text = text.split(START, 1)[1]
    if END not in text:
        return (text or None), None
    reasoning, _, content = text.partition(END)
    return reasoning, (content or None)


def uses_think(tokenizer, chat_template: str | None = None) -> bool:
    """Whether a model writes R1's `<think>` reasoning: its chat template or its vocabulary has the tags."""
    template = chat_template or (tokenizer.chat_template if tokenizer is not None else None) or ""
    return START in template or (tokenizer is not None and tokenizer.token_to_id(END) is not None)


def prompt_opens_reasoning(prompt: str) -> bool:
    """Whether a rendered prompt ends inside an open `<think>` block, so that the output starts as reasoning."""
    return prompt.rstrip().endswith(START)


def close_reasoning(prompt: str) -> str:
    """The prompt with an empty reasoning block closed after it (`thinking: false` for a template that has no
    switch of its own, as Qwen3's template does for enable_thinking=false): the model starts in the answer."""
    if prompt.endswith(START + "\n"):
        return prompt + "\n" + END + "\n\n"
    if prompt.endswith(START):
        return prompt + "\n\n" + END + "\n\n"
    return prompt + START + "\n\n" + END + "\n\n"


def count_reasoning_tokens(token_ids: list[int], end_id: int | None, has_reasoning: bool = True) -> int:
    """Tokens up to and including `</think>`; all of them while the reasoning has not ended."""
    if end_id is None or not has_reasoning:
        return 0
    try:
        return token_ids.index(end_id) + 1
    except ValueError:
        return len(token_ids)


@dataclass
class ReasoningStream:
    """Turns cumulative output text into (reasoning delta, content delta) pairs."""

    starts_in_reasoning: bool = True
    sent_reasoning: int = 0
    sent_content: int = 0

    def update(self, text: str, finished: bool) -> tuple[str, str]:
        if not finished:
            opening = text.lstrip()
            if not self.starts_in_reasoning and len(opening) <= len(START) and START.startswith(opening):
                return "", ""  # blank so far, or the start of an opening tag: either part may follow
            text = text[: len(text) - _partial_tag_length(text)]
        reasoning, content = split(text, self.starts_in_reasoning)
        reasoning, content = reasoning or "", content or ""
        delta_reasoning = reasoning[self.sent_reasoning :]
        delta_content = content[self.sent_content :]
        self.sent_reasoning, self.sent_content = len(reasoning), len(content)
        return delta_reasoning, delta_content


def _partial_tag_length(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a tag."""
    longest = 0
    for tag in (START, END):
        for n in range(1, len(tag)):
            if text.endswith(tag[:n]):
                longest = max(longest, n)
    return longest
