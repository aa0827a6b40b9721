"""The forced-call grammars and the parsers agree: what a model writes under a format's grammar parses back to
calls naming the allowed tools, with arguments valid for their schemas (the tiny random model, offline)."""

import json

import jsonschema
import pytest

from dsserve import SamplingParams
from dsserve.engine.structured import StructuredOutput, with_json_style
from dsserve.tool_parsers import FORMATS, call_grammar

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "北京"]}, "days": {"type": "integer", "minimum": 1,
                                                                                "maximum": 7},
                                     "note": {"type": "string"}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}, "exact": {"type": "boolean"}},
    "required": ["zone"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.mark.parametrize("fmt", ["deepseek_v3", "deepseek_v31", "deepseek_v32"])
@pytest.mark.parametrize("parallel", [True, False])
def test_grammar_output_parses_to_valid_calls(tiny_llm, fmt, parallel):
    grammar = call_grammar([WEATHER, TIME], fmt, parallel, with_json_style)
    tokenizer = tiny_llm.tokenizer
    # the random model's free strings end when '"' (JSON) and "<" (DSML's raw text) are likely, its blocks of calls
    # when the "s" that closes <｜tool▁calls▁end｜> is
    bias = {tokenizer.encode(c, add_special_tokens=False)[0]: 6.0 for c in '<s"'}
    params = SamplingParams(n=6, temperature=1.0, seed=3, max_tokens=400, logit_bias=bias,
                            structured=StructuredOutput(lark=grammar, param="tools"))
    for completion in tiny_llm.generate([[0, 12, 40, 7]], params)[0].outputs:
        assert completion.finish_reason == "stop", completion.text
        parsed = FORMATS[fmt].parse(completion.text)
        assert parsed.content == "" and parsed.calls, completion.text
        assert parallel or len(parsed.calls) == 1
        for call in parsed.calls:
            assert call.is_complete
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def _dsml(arguments: dict) -> str:
    body = "\n".join(f'<｜DSML｜parameter name="{k}" string="true">{v}</｜DSML｜parameter>' for k, v in arguments.items())
    return f'<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n{body}\n</｜DSML｜invoke>\n</｜DSML｜function_calls>'


CODES = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]+$"}, "note": {"type": "string", "minLength": 1, "maxLength": 4},
    "path": {"type": "string", "pattern": "a/b"}}, "required": ["code", "note", "path"]}}}


@pytest.mark.parametrize("arguments,is_valid", [
    pytest.param({"code": "AB-12", "note": "hey", "path": "xa/by"}, True, id="valid"),
    pytest.param({"code": "AB-1x", "note": "hey", "path": "a/b"}, False, id="pattern-anchored"),
    pytest.param({"code": "AB-12", "note": "", "path": "a/b"}, False, id="minLength"),
    pytest.param({"code": "AB-12", "note": "hello", "path": "a/b"}, False, id="maxLength"),
    pytest.param({"code": "AB-12", "note": "h", "path": "ab"}, False, id="pattern-unanchored-with-slash"),
])
def test_dsml_grammar_holds_string_length_and_pattern(tiny_llm, arguments, is_valid):
    """A DSML string argument is raw text: its minLength, maxLength and pattern (JSON Schema's unanchored search
    unless written with ^ and $) are held by the text's regex, as the JSON formats hold them."""
    import llguidance

    grammar = call_grammar([CODES], "deepseek_v32", False, with_json_style)
    tokenizer = tiny_llm.tokenizer
    ll_tokenizer = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=tokenizer.vocab_size,
                                          eos_token=[tokenizer.eos_token_id])
    assert not llguidance.LLMatcher.validate_grammar(grammar, ll_tokenizer)
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
    ids = tokenizer.encode(_dsml(arguments), add_special_tokens=False)
    assert (all(matcher.consume_token(i) for i in ids) and matcher.is_accepting()) == is_valid
    assert is_valid == _is_valid(arguments, CODES["function"]["parameters"])


def _is_valid(instance, schema) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(instance)


@pytest.mark.parametrize("parameters,param", [
    pytest.param({"type": "object", "oneOf": [{"required": ["a"]}, {"required": ["b"]}],
                  "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
                 "tools[0].function.parameters", id="top-level-oneOf"),
    pytest.param({"type": "object", "properties": {"day": {"type": "string", "format": "date"}}},
                 "tools[0].function.parameters.properties.day", id="string-format"),
])
def test_dsml_grammar_refuses_what_its_markup_cannot_hold(parameters, param):
    from dsserve.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as e:
        call_grammar([{"type": "function", "function": {"name": "f", "parameters": parameters}}], "deepseek_v32", True)
    assert e.value.param == param
    call_grammar([{"type": "function", "function": {"name": "f", "parameters": parameters}}], "deepseek_v31", True)


@pytest.mark.parametrize("fmt,markers", [
    pytest.param("deepseek_v32", ["｜DSML｜"], id="v32-dsml-special"),
    pytest.param("deepseek_v31", ["<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>",
                                  "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>"], id="v31-markers-special"),
])
def test_special_marker_tokens_are_named_by_id(tmp_path, fmt, markers):
    """When the tokenizer marks a format's markers special (V3.2's ｜DSML｜ is), the forced-call grammar admits the
    model's one special token for each, not a spelling of its text in ordinary tokens."""
    import llguidance
    from tokenizers import AddedToken

    from dsserve.assets.tiny_random import byte_level_tokenizer
    from dsserve.engine.tokenizer import Tokenizer

    hf = byte_level_tokenizer()
    hf.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in markers])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<｜end▁of▁sentence｜>"}))
    tokenizer = Tokenizer(tmp_path)
    assert set(tokenizer.special_markers) == set(markers)
    ll_tokenizer = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=tokenizer.vocab_size,
                                          eos_token=[tokenizer.eos_token_id])
    grammar = call_grammar([TIME], fmt, False, with_json_style, tokenizer.special_markers)
    answer = FORMAT_CALLS[fmt]
    spelled = [i for ch in answer for i in tokenizer.encode(ch, add_special_tokens=False)]  # markers char by char
    for ids, is_accepted in ((tokenizer.encode(answer, add_special_tokens=False), True), (spelled, False)):
        assert (tokenizer.token_to_id(markers[0]) in ids) == is_accepted
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        assert (all(matcher.consume_token(i) for i in ids) and matcher.is_accepting()) == is_accepted


FORMAT_CALLS = {
    "deepseek_v32": '<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_time">\n'
                    '<｜DSML｜parameter name="zone" string="true">UTC</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
                    '</｜DSML｜function_calls>',
    "deepseek_v31": '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{"zone": "UTC"}<｜tool▁call▁end｜>'
                    '<｜tool▁calls▁end｜>',
}
