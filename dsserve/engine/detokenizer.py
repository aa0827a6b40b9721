"""Incremental detokenization (UTF-8 safe) and stop strings (cut exactly, never emitted)."""

from __future__ import annotations

from dsserve.engine.tokenizer import Tokenizer

# Decode from a few tokens back so that tokenizers which drop a leading space (Metaspace) decode correctly.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text, holding back bytes of unfinished characters."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool, stop: list[str],
                 include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.holdback = max((len(s) for s in stop), default=1) - 1  # chars that may start a stop string
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # decoded output so far (may end with a partial stop string)
        self.stopped_by: str | None = None

    def append(self, token_id: int) -> str | None:
        """Add one token. Returns the stop string if the text now contains one (the text is cut there)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None  # an incomplete UTF-8 sequence: wait for the next token
        new_text = full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        start = max(0, len(self.text) - self.holdback)
        self.text += new_text
        for stop in self.stop:
            index = self.text.find(stop, start)
            if index != -1:
                self.text = self.text[: index + len(stop)] if self.include_stop else self.text[:index]
                self.stopped_by = stop
                return stop
        return None

    def visible_text(self, finished: bool) -> str:
        """Text safe to show now: while running, the tail that could begin a stop string is held back."""
        if finished:
            self._flush()
            return self.text
        if not self.stop or self.holdback == 0:
            return self.text
        return self.text[: max(0, len(self.text) - self.holdback)]

    def _flush(self) -> None:
        """At the end, bytes that never formed a character are shown as U+FFFD rather than dropped."""
        if self.read_offset < len(self.ids) and self.stopped_by is None:
            prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
            full = self.tokenizer.decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset = len(self.ids)
