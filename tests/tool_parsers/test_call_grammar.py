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
