"""What a request's structured-output fields ask of its answer (response_format, vLLM's guided_* fields and its
structured_outputs object), checked: chat and text completions share them."""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from dsserve.engine.structured import StructuredOutput
from dsserve.server.protocol import APIError, StructuredFields


def answer_constraint(req: StructuredFields) -> tuple[str, StructuredOutput] | None:
    """(field, grammar) of the one structured-output field the request sets, or None; two are a 400 naming the
    second."""
    asked = answer_constraints(req)
    if len(asked) > 1:
        raise APIError(400, f"'{asked[0][0]}' and '{asked[1][0]}' both constrain the answer; send one.",
                       param=asked[1][0], code="invalid_value")
    return asked[0] if asked else None


def check_min_tokens(structured: StructuredOutput | None, min_tokens: int) -> None:
    if structured is not None and min_tokens:
        raise APIError(400, "min_tokens cannot be combined with a grammar: it would forbid the end of a complete "
                       "answer.", param="min_tokens", code="invalid_value")


def answer_constraints(req: StructuredFields) -> list[tuple[str, StructuredOutput]]:
    """(field, grammar) of each structured-output field the request sets; more than one is the caller's 400."""
    out = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        out.append(("response_format", StructuredOutput(json_schema={"type": "object"}, param="response_format")))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.json_schema is None:
            raise APIError(400, "Missing required parameter: 'response_format.json_schema.schema'.",
                           param="response_format.json_schema.schema", code="missing_required_parameter")
        out.append(("response_format", StructuredOutput(
            json_schema=checked_schema(rf.json_schema.json_schema, "response_format.json_schema.schema"),
            param="response_format.json_schema.schema")))
    so = req.structured_outputs
    for field_name, guided, nested in (("guided_json", req.guided_json, so and so.json_),
                                       ("guided_regex", req.guided_regex, so and so.regex),
                                       ("guided_choice", req.guided_choice, so and so.choice),
                                       ("guided_grammar", req.guided_grammar, so and so.grammar)):
        for name, value in ((field_name, guided), (f"structured_outputs.{field_name[7:]}", nested)):
            if value is None:
                continue
            if field_name == "guided_json":
                spec = StructuredOutput(json_schema=checked_schema(_json_value(value, name), name), param=name)
            elif field_name == "guided_regex":
                spec = StructuredOutput(regex=value, param=name)
            elif field_name == "guided_choice":
                spec = StructuredOutput(choice=tuple(value), param=name)
            else:
                spec = StructuredOutput(lark=_lark(value), param=name)
            out.append((name, spec))
    if so is not None and so.json_object:
        out.append(("structured_outputs.json_object", StructuredOutput(json_schema={"type": "object"},
                                                                       param="structured_outputs.json_object")))
    return out


def _json_value(value: Any, param: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        raise APIError(400, f"Invalid '{param}': not valid JSON.", param=param, code="invalid_value") from None


def checked_schema(schema: Any, param: str) -> dict:
    if not isinstance(schema, dict):
        raise APIError(400, f"Invalid '{param}': a JSON schema is an object.", param=param, code="invalid_value")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise APIError(400, f"Invalid '{param}': not a valid JSON schema ({e.message[:300]}).", param=param,
                       code="invalid_value") from None
    except RecursionError:
        raise APIError(400, f"Invalid '{param}': the schema is nested too deeply.", param=param,
                       code="invalid_value") from None
    return schema


def _lark(grammar: str) -> str:
    """vLLM takes Lark or GBNF (llama.cpp's `::=` rules): GBNF is converted, Lark is llguidance's own input."""
    if "::=" in grammar:
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            return gbnf_to_lark(grammar)
        except Exception:  # noqa: BLE001 - the converter's own errors: the grammar is what is wrong
            return grammar  # the compiler's message then names the problem
    return grammar
