"""Grammar-constrained decoding with llguidance: a request's grammar, a matcher per sequence, token masks.

A request's `StructuredOutput` (a JSON schema, a regex, a list of choices or a Lark grammar) is compiled once when
the request is added; each of its sequences gets its own matcher. Before each forward pass the runner has the
matchers of the rows that need one write their allowed tokens into a bitmask (llguidance's executor, in parallel
and with the GIL released: on a thread beside the forward pass on a GPU or where a CPU core is free, else in the
step's own thread); the sampler then sends the disallowed logits of those
rows to -inf. A sequence that reasons first (`after_token_id`, R1's `</think>`) is free until that token.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass

import llguidance
import torch

from dsserve.errors import InvalidRequestError


_VERDICTS_KEPT = 256  # distinct grammars whose check is remembered
_UNSEEN = object()

# JSON is written in one fixed style, Python's json.dumps's: ", " and ": " and no other whitespace. With free
# whitespace a model may spend its tokens on blanks (a weak one does, until max_tokens).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match. Exactly one of the grammar kinds is set."""

    json_schema: dict | None = None  # a JSON schema
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # one of these strings exactly
    lark: str | None = None  # a Lark grammar (llguidance's dialect: %json {...} for a schema; see with_json_style)
    param: str = "response_format"  # the request field it came from, for error messages
    after_token_id: int | None = None  # free output until this token (the end of the reasoning), then the grammar

    def grammar(self) -> str:
        if self.json_schema is not None:
            return llguidance.LLMatcher.grammar_from_json_schema(self.json_schema, defaults=JSON_STYLE)
        if self.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return "start: " + " | ".join(_lark_string(c) for c in self.choice)
        assert self.lark is not None
        return self.lark


class GrammarCompiler:
    """The llguidance view of one tokenizer; compiles a request's grammar into matchers."""

    def __init__(self, tokenizer_json: str, eos_token_ids: tuple[int, ...], vocab_size: int):
        self.vocab_size = vocab_size
        self.ll_tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self.executor = llguidance.LLExecutor()
        # grammar text -> llguidance's verdict on it: agents send the same few schemas over and over, and each check
        # costs ~2 ms (64 requests of one schema: 8% of their decoding on the demo model)
        self._verdicts: collections.OrderedDict[str, str | None] = collections.OrderedDict()

    def compile(self, spec: StructuredOutput) -> str:
        """The grammar of `spec`, checked: InvalidRequestError naming the request's field when it is not valid."""
        try:
            grammar = spec.grammar()
            error = self._verdicts.get(grammar, _UNSEEN)
            if error is _UNSEEN:
                error = self._verdicts[grammar] = llguidance.LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
                if len(self._verdicts) > _VERDICTS_KEPT:
                    self._verdicts.popitem(last=False)
            else:
                self._verdicts.move_to_end(grammar)
        except _GRAMMAR_ERRORS as e:  # e.g. text that is not UTF-8 (a lone surrogate from JSON)
            raise InvalidRequestError(f"Invalid '{spec.param}': {_first_line(e)}", param=spec.param) from None
        if error and not error.startswith("WARNING"):
            raise InvalidRequestError(f"Invalid '{spec.param}': {_first_line(error)}", param=spec.param)
        return grammar

    def matcher(self, grammar: str, spec: StructuredOutput) -> "Constraint":
        try:
            matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        except _GRAMMAR_ERRORS as e:
            raise InvalidRequestError(f"Invalid '{spec.param}': {_first_line(e)}", param=spec.param) from None
        if matcher.is_error():
            raise InvalidRequestError(f"Invalid '{spec.param}': {_first_line(matcher.get_error())}", param=spec.param)
        return Constraint(matcher, spec.after_token_id)

    def fill_masks(self, constraints: list["Constraint"]) -> torch.Tensor:
        """(N, ceil(V/32)) int32 bitmask, row j for constraints[j] (bit set: the token is allowed)."""
        mask = torch.full(((len(constraints)), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        self.executor.unsafe_compute_mask_ptr([(c.matcher, j) for j, c in enumerate(constraints)], mask.data_ptr(),
                                              mask.shape[1] * 4, len(constraints))
        return mask


class Constraint:
    """One sequence's grammar state: inactive while it reasons, then it follows the grammar token by token."""

    def __init__(self, matcher: llguidance.LLMatcher, after_token_id: int | None):
        self.matcher = matcher
        self.is_active = after_token_id is None
        self.after_token_id = after_token_id

    def advance(self, token_id: int) -> None:
        if not self.is_active:
            self.is_active = token_id == self.after_token_id
            return
        was_complete = self.matcher.is_stopped()  # then only EOS was allowed; past it (ignore_eos) anything goes
        if not self.matcher.consume_token(token_id) and not was_complete:
            raise RuntimeError(f"the grammar rejected token {token_id}: {self.matcher.get_error()}")


def with_json_style(schema: dict) -> dict:
    """A schema for a Lark grammar's %json rule, written in JSON_STYLE (a schema's own x-guidance wins)."""
    return {**schema, "x-guidance": {**JSON_STYLE, **(schema.get("x-guidance") or {})}}


_GRAMMAR_ERRORS = (ValueError, TypeError, RuntimeError, RecursionError, UnicodeError)


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:500] if text else "invalid grammar"
