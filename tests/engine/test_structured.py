"""Grammars in the engine: compiled once per request, a 400-style error naming the field, free until </think>."""

import json

import pytest

from dsserve import LLM, SamplingParams
from dsserve.engine.structured import GrammarCompiler, StructuredOutput
from dsserve.errors import InvalidRequestError


@pytest.fixture(scope="module")
def compiler(tiny_r1):
    from dsserve.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(tiny_r1)
    return tokenizer, GrammarCompiler(tokenizer.to_json(), (1,), tokenizer.vocab_size)


@pytest.mark.parametrize("spec", [
    pytest.param(StructuredOutput(regex="(unclosed", param="guided_regex"), id="regex"),
    pytest.param(StructuredOutput(lark="start: missing_rule", param="guided_grammar"), id="lark"),
    pytest.param(StructuredOutput(json_schema={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}},
                                  param="guided_json"), id="schema-ref"),
])
def test_invalid_grammar_names_the_field(compiler, spec):
    _, grammars = compiler
    with pytest.raises(InvalidRequestError) as e:
        grammars.matcher(grammars.compile(spec), spec)
    assert e.value.param == spec.param


def test_a_grammar_is_checked_once_and_its_verdict_kept(compiler, monkeypatch):
    """The same schema again (agents resend theirs) reuses llguidance's verdict; an invalid one stays refused."""
    import llguidance

    _, grammars = compiler
    checks = []
    real = llguidance.LLMatcher.validate_grammar
    monkeypatch.setattr(llguidance.LLMatcher, "validate_grammar",
                        staticmethod(lambda grammar, tokenizer: checks.append(grammar) or real(grammar, tokenizer)))
    good = StructuredOutput(json_schema={"type": "object", "properties": {"n": {"type": "integer"}}},
                            param="response_format")
    bad = StructuredOutput(regex="(never closed", param="guided_regex")
    for _ in range(3):
        assert grammars.compile(good) == good.grammar()
        with pytest.raises(InvalidRequestError, match="guided_regex"):
            grammars.matcher(grammars.compile(bad), bad)
    assert len(checks) == 2


def test_constraint_is_free_until_the_end_of_the_reasoning(compiler):
    tokenizer, grammars = compiler
    end = tokenizer.token_to_id("</think>")
    spec = StructuredOutput(choice=("yes", "no"), after_token_id=end)
    constraint = grammars.matcher(grammars.compile(spec), spec)
    for token in tokenizer.encode("free text", add_special_tokens=False):
        constraint.advance(token)  # not checked: still reasoning
    assert not constraint.is_active
    constraint.advance(end)
    assert constraint.is_active
    mask = grammars.fill_masks([constraint])[0]
    allowed = [t for t in range(tokenizer.vocab_size) if (int(mask[t // 32]) >> (t % 32)) & 1]
    assert set(allowed) == set(tokenizer.encode("ny", add_special_tokens=False))  # the first letters
    with pytest.raises(RuntimeError):
        constraint.advance(tokenizer.encode("x", add_special_tokens=False)[0])


def test_offline_generation_follows_the_schema(tiny_llm):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    params = SamplingParams(n=6, temperature=1.0, seed=1, max_tokens=60,
                            structured=StructuredOutput(json_schema=schema))
    outputs = tiny_llm.generate([[0, 10, 20, 30]], params)
    for completion in outputs[0].outputs:
        value = json.loads(completion.text)
        assert value["ok"] in (True, False) and value["n"] in (1, 2, 3)
        assert completion.finish_reason == "stop"
