"""DeepSeek's tool-call formats (docs/tool-calling.md has them with examples), parsed from an answer's text.

Each format is read by one scan over the text (the answer, after the reasoning parser took the reasoning out). The
scan stops where the text stops making sense as tool calls and gives the rest back as content, and, while the answer
is still being generated, it keeps back whatever could still turn into a marker: a partial marker at the end, the
tail of an argument that could be the start of the call's end marker, blank text that could precede the calls.

Streaming runs the same scan on the text so far and emits what grew: each call's name once its header is complete,
then its arguments as they grow. Every scan result extends the previous one, so the streamed deltas concatenate to
exactly the non-streamed result, wherever the chunks were cut.
"""

from __future__ import annotations

import abc
import json
import re
from dataclasses import dataclass, field

from dsserve.errors import InvalidRequestError

# The markers, as DeepSeek's tokenizers spell them: bars are U+FF5C, the word separator U+2581.
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
DSML = "｜DSML｜"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text (the format's own text for V3 and V3.1; built from the parameters for DSML)
    is_complete: bool = True  # False: the answer ended inside this call (max_tokens)


@dataclass
class ParsedOutput:
    content: str  # the text outside the tool calls
    calls: list[ToolCall] = field(default_factory=list)


@dataclass
class ToolCallDelta:
    index: int
    name: str | None  # set on a call's first delta only
    arguments: str


class ToolCallFormat(abc.ABC):
    """One format: `scan(text, is_final)` -> ParsedOutput. `is_final` False: the text may still grow, so anything
    that could still become part of a marker is kept back (neither content nor arguments yet)."""

    name = ""
    begin = ""  # the marker that opens the block of calls

    def scan(self, text: str, is_final: bool) -> ParsedOutput:
        start = text.find(self.begin)
        if start < 0:
            return ParsedOutput(_held_content(text, self.begin, is_final))
        cursor = _Cursor(text, start + len(self.begin), is_final)
        calls = self._calls(cursor)
        before = text[:start].rstrip()
        if not calls:
            return ParsedOutput(text if is_final else before)
        rest = cursor.rest() if cursor.stopped_at is not None else ""
        return ParsedOutput(before + rest, calls)

    @abc.abstractmethod
    def _calls(self, cursor: "_Cursor") -> list[ToolCall]:
        """The calls between the begin marker and the cursor's stop (each format reads its own markup)."""

    def parse(self, text: str) -> ParsedOutput:
        return self.scan(text, is_final=True)


class DeepSeekV3(ToolCallFormat):
    """R1, V3, V3-0324, R1-0528 and the R1 distills: a type, the name, then the arguments in a ```json fence."""

    name, begin = "deepseek_v3", CALLS_BEGIN

    def _calls(self, cursor):
        calls = []
        while cursor.expect_next(CALL_BEGIN):
            if cursor.until(SEP) is None:  # the type ("function")
                break
            name = cursor.until("\n```json\n")
            if name is None:
                break
            arguments, is_complete = cursor.until_or_rest("\n```" + CALL_END)
            calls.append(ToolCall(name.strip(), arguments, is_complete))
            if not is_complete:
                break
        cursor.expect_end(CALLS_END)
        return calls


class DeepSeekV31(ToolCallFormat):
    """V3.1 and V3.1-Terminus: no type and no fence, the name then the JSON arguments."""

    name, begin = "deepseek_v31", CALLS_BEGIN

    def _calls(self, cursor):
        calls = []
        while cursor.expect_next(CALL_BEGIN):
            name = cursor.until(SEP)
            if name is None:
                break
            arguments, is_complete = cursor.until_or_rest(CALL_END)
            calls.append(ToolCall(name.strip(), arguments, is_complete))
            if not is_complete:
                break
        cursor.expect_end(CALLS_END)
        return calls


class DeepSeekV32(ToolCallFormat):
    """V3.2's DSML markup: one invoke per call, one parameter element per argument; string="true" values are raw
    text, the others JSON. The arguments are rebuilt as a JSON object, one parameter at a time."""

    name, begin = "deepseek_v32", f"<{DSML}function_calls>"

    def _calls(self, cursor):
        calls = []
        while cursor.expect_next(f'<{DSML}invoke name="'):
            name = cursor.until('">')
            if name is None:
                break
            items, is_complete = [], False
            call = ToolCall(name, "{", is_complete=False)
            calls.append(call)
            while True:
                marker = cursor.expect_next(f"</{DSML}invoke>", f'<{DSML}parameter name="')
                if marker != f'<{DSML}parameter name="':
                    is_complete = marker is not None
                    break
                key = cursor.until('" string="')
                is_string = cursor.until('">') if key is not None else None
                value = cursor.until(f"</{DSML}parameter>") if is_string is not None else None
                if value is None:
                    break
                if is_string.strip() != "true":
                    try:
                        value = json.loads(value)
                    except ValueError:
                        pass  # kept as the text the model wrote
                items.append(f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}")
                call.arguments = "{" + ", ".join(items)
            if is_complete or cursor.is_final:  # at the end of a cut answer: the parameters it had, closed
                call.arguments += "}"
            call.is_complete = is_complete
            if not is_complete:
                break
        cursor.expect_end(f"</{DSML}function_calls>")
        return calls


FORMATS: dict[str, ToolCallFormat] = {f.name: f for f in (DeepSeekV3(), DeepSeekV31(), DeepSeekV32())}


def detect_format(chat_template: str | None, model_type: str | None = None) -> str | None:
    """The tool-call format a checkpoint's chat template writes tool calls in; None when it writes none."""
    template = chat_template or ""
    if DSML in template or model_type == "deepseek_v32":
        return "deepseek_v32"
    if SEP in template:
        return "deepseek_v3" if "```json" in template else "deepseek_v31"
    return None


def call_grammar(tools: list[dict], format_name: str, parallel: bool, style=lambda schema: schema,
                 special_tokens: dict[str, int] | None = None) -> str:
    """A Lark grammar (llguidance's dialect) that admits only a block of tool calls in `format_name`, each naming
    one of `tools` with arguments valid for its `parameters` schema (each schema passed through `style`).

    `special_tokens`: marker text -> id of the markers the tokenizer marks special (V3.2's ｜DSML｜). The grammar
    names those by id (`<[id]>`): llguidance matches a quoted string against ordinary tokens only, so a literal
    marker would force the model to spell it out byte by byte instead of writing its one token."""
    text = _Literals(special_tokens or {})
    if format_name == "deepseek_v32":
        return _dsml_grammar(tools, parallel, style, text)
    headers = {
        "deepseek_v3": lambda name: (f"{CALL_BEGIN}function{SEP}{name}\n```json\n", "\n```" + CALL_END),
        "deepseek_v31": lambda name: (f"{CALL_BEGIN}{name}{SEP}", CALL_END),
    }[format_name]
    rules = []
    for i, tool in enumerate(tools):
        function = tool["function"]
        opening, closing = headers(function["name"])
        rules.append(f"call_{i}: {text(opening)} args_{i} {text(closing)}")
        rules.append(f"args_{i}: %json {json.dumps(style(_parameters(function)), ensure_ascii=False)}")
    between = "\n" if format_name == "deepseek_v3" else ""  # R1's template puts a newline between calls, V3.1's none
    return _block_grammar(CALLS_BEGIN, between, CALLS_END, len(tools), parallel, rules, text)


def _dsml_grammar(tools: list[dict], parallel: bool, style, text: "_Literals") -> str:
    """DSML: one parameter element per property, in the schema's order, the required ones always, the others
    optional. String properties are raw text without `<` (an enum of strings: one of them; minLength, maxLength and
    pattern held by the text's regex), the others JSON for their schema. Properties beyond `properties` are not
    written. What the markup cannot hold (keywords across properties, such as a top-level oneOf, or a string's
    format) is refused: InvalidRequestError naming the tool."""
    rules = []
    for i, tool in enumerate(tools):
        function = tool["function"]
        schema = _parameters(function)
        param = f"tools[{i}].function.parameters"
        _check_dsml_schema(schema, param)
        definitions = {k: schema[k] for k in ("$defs", "definitions") if k in schema}  # what "$ref"s point into
        required = set(schema.get("required") or [])
        params = []
        for j, (key, prop) in enumerate((schema.get("properties") or {}).items()):
            prop = prop if isinstance(prop, dict) else {}
            enum = [prop["const"]] if "const" in prop else prop.get("enum")
            is_string = prop.get("type") == "string" or bool(enum and all(isinstance(v, str) for v in enum))
            opening = f'<{DSML}parameter name="{key}" string="{"true" if is_string else "false"}">'
            if is_string and enum:
                value = " | ".join(_lark_literal(v) for v in enum)
            elif is_string:
                value = f"TEXT_{i}_{j}"  # a token (upper case): llguidance intersects tokens' regexes, not rules'
                rules.append(f"{value}: {_dsml_text(prop, f'{param}.properties.{key}')}")
            else:
                value = f"%json {json.dumps(style({**prop, **definitions}), ensure_ascii=False)}"
            rules.append(f"p_{i}_{j}: {text(opening)} v_{i}_{j} {text(f'</{DSML}parameter>' + chr(10))}")
            rules.append(f"v_{i}_{j}: {value}")
            params.append(f"p_{i}_{j}" + ("" if key in required else "?"))
        opening = f'<{DSML}invoke name="{function["name"]}">\n'
        rules.append(f"call_{i}: {text(opening)} {' '.join(params)} {text(f'</{DSML}invoke>')}")
    return _block_grammar(f"<{DSML}function_calls>\n", "\n", f"\n</{DSML}function_calls>", len(tools), parallel,
                          rules, text)


# The keywords of a tool's parameters schema that DSML's one-element-per-property markup holds; the others (oneOf,
# anyOf, allOf, not, if/then/else, dependentRequired, minProperties... at the top) constrain several properties at
# once, which the grammar cannot write property by property.
_DSML_TOP_KEYWORDS = {"type", "properties", "required", "additionalProperties", "title", "description", "$schema",
                      "$id", "$defs", "definitions", "default", "examples", "strict", "$comment"}
# A string property's keywords that its raw text holds (format would need llguidance's JSON string formats).
_DSML_STRING_KEYWORDS = {"type", "enum", "const", "minLength", "maxLength", "pattern", "title", "description",
                         "default", "examples", "$comment"}


def _check_dsml_schema(schema: dict, param: str) -> None:
    extra = sorted(set(schema) - _DSML_TOP_KEYWORDS)
    if extra:
        raise InvalidRequestError(
            f"Invalid '{param}': '{extra[0]}' constrains several arguments at once, which a forced call in this "
            "model's DSML format cannot hold (it writes one argument at a time); describe each argument in "
            "'properties', or use tool_choice 'auto'.", param=param)
    if schema.get("type", "object") != "object":
        raise InvalidRequestError(f"Invalid '{param}': a tool's parameters are an object (type 'object').", param=param)


def _dsml_text(prop: dict, param: str) -> str:
    """The Lark rule of a string property's raw text: no `<` (it would open the closing tag), and its minLength,
    maxLength and pattern (unanchored, as JSON Schema reads it, unless written with ^ or $) as regexes the text must
    match at once (llguidance's `&`)."""
    unsupported = sorted(set(prop) - _DSML_STRING_KEYWORDS)
    if unsupported:
        raise InvalidRequestError(f"Invalid '{param}': '{unsupported[0]}' of a string argument cannot be held by this "
                                  "model's DSML format, which writes strings as raw text; leave it out or use "
                                  "tool_choice 'auto'.", param=param)
    low, high = prop.get("minLength", 0), prop.get("maxLength")
    parts = [f"/[^<]{{{low},{'' if high is None else high}}}/"]
    pattern = prop.get("pattern")
    if pattern is not None:
        is_anchored_start = pattern.startswith("^")
        is_anchored_end = pattern.endswith("$") and not pattern.endswith("\\$")
        core = pattern[1 if is_anchored_start else 0: -1 if is_anchored_end else None]
        core = re.sub(r"(?<!\\)/", r"\/", core)  # a Lark regex ends at an unescaped /
        parts.append("/" + ("" if is_anchored_start else "[^<]*") + f"(?:{core})" + ("" if is_anchored_end else "[^<]*")
                     + "/")
    return " & ".join(parts)


def _block_grammar(begin: str, between: str, end: str, num_tools: int, parallel: bool, rules: list[str],
                   text: "_Literals") -> str:
    more = f" ({text(between)} call)*" if parallel and between else (" call*" if parallel else "")
    return "\n".join([
        "start: calls | BLANK calls",
        "BLANK: /[ \\n]+/",
        f"calls: {text(begin)} call{more} {text(end)}",
        "call: " + " | ".join(f"call_{i}" for i in range(num_tools)),
        *rules,
    ])


def _parameters(function: dict) -> dict:
    return function.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}


def _lark_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class _Literals:
    """Markup text -> a Lark sequence: quoted strings, and `<[id]>` for each special token in it."""

    def __init__(self, special_tokens: dict[str, int]):
        self.special_tokens = special_tokens
        self.pattern = re.compile("|".join(re.escape(t) for t in sorted(special_tokens, key=len, reverse=True))) \
            if special_tokens else None

    def __call__(self, text: str) -> str:
        if self.pattern is None:
            return _lark_literal(text)
        parts, start = [], 0
        for match in self.pattern.finditer(text):
            if match.start() > start:
                parts.append(_lark_literal(text[start:match.start()]))
            parts.append(f"<[{self.special_tokens[match.group()]}]>")
            start = match.end()
        if start < len(text) or not parts:
            parts.append(_lark_literal(text[start:]))
        return " ".join(parts) if len(parts) == 1 else "(" + " ".join(parts) + ")"


def tool_prompt(tools: list[dict], format_name: str) -> str:
    """The tools described for a chat template that does not render them itself: DeepSeek's tool system prompt
    (the V3.1 model card's), with the call format of `format_name` spelled out."""
    lines = ["## Tools", "You have access to the following tools:"]
    for tool in tools:
        function = tool["function"]
        lines += ["", f"### {function['name']}", f"Description: {function.get('description', '')}", "",
                  f"Parameters: {json.dumps(function.get('parameters') or {'type': 'object', 'properties': {}}, ensure_ascii=False)}"]
    example = {
        "deepseek_v3": f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}tool_call_name\n```json\ntool_call_arguments\n```{CALL_END}"
                       f"{{additional_tool_calls}}{CALLS_END}",
        "deepseek_v31": f"{CALLS_BEGIN}{CALL_BEGIN}tool_call_name{SEP}tool_call_arguments{CALL_END}"
                        f"{{additional_tool_calls}}{CALLS_END}",
        "deepseek_v32": f'<{DSML}function_calls>\n<{DSML}invoke name="tool_call_name">\n<{DSML}parameter name="name" '
                        f'string="true|false">value</{DSML}parameter>\n</{DSML}invoke>\n</{DSML}function_calls>',
    }[format_name]
    lines += ["", "IMPORTANT: ALWAYS adhere to this exact format for tool use:", example, "",
              "Where:", "- `tool_call_name` must be an exact match to one of the available tools",
              "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema"]
    return "\n".join(lines)


class ToolCallStream:
    """Cumulative answer text -> (content delta, tool-call deltas), by the same scan as the non-streamed parse."""

    def __init__(self, fmt: ToolCallFormat):
        self.fmt = fmt
        self.sent_content = 0
        self.sent_names: list[bool] = []
        self.sent_arguments: list[int] = []

    def update(self, text: str, is_final: bool) -> tuple[str, list[ToolCallDelta]]:
        parsed = self.fmt.scan(text, is_final)
        content = parsed.content[self.sent_content:]
        self.sent_content = max(self.sent_content, len(parsed.content))
        deltas = []
        for i, call in enumerate(parsed.calls):
            if i == len(self.sent_names):
                self.sent_names.append(True)
                self.sent_arguments.append(0)
                deltas.append(ToolCallDelta(i, call.name, ""))
            grown = call.arguments[self.sent_arguments[i]:]
            if grown:
                self.sent_arguments[i] = len(call.arguments)
                if deltas and deltas[-1].index == i:
                    deltas[-1].arguments += grown
                else:
                    deltas.append(ToolCallDelta(i, None, grown))
        return content, deltas


class _Cursor:
    """Reads markers off the text. A read that meets the end of a still-growing text stops the scan (stopped_at)."""

    def __init__(self, text: str, pos: int, is_final: bool):
        self.text, self.pos, self.is_final = text, pos, is_final
        self.stopped_at: int | None = None  # where the calls stopped making sense: the rest is content

    def rest(self) -> str:
        return self.text[self.stopped_at:]

    def expect_next(self, *markers: str) -> str | None:
        """Blank text, then one of `markers`: consumed and returned. Anything else stops the scan."""
        if self.stopped_at is not None:
            return None
        start = self.pos
        while start < len(self.text) and self.text[start].isspace():
            start += 1
        for marker in markers:
            if self.text.startswith(marker, start):
                self.pos = start + len(marker)
                return marker
        self.stopped_at = self.pos
        if not self.is_final and any(marker.startswith(self.text[start:]) for marker in markers):
            self.stopped_at = len(self.text)  # may still become a marker: nothing is content yet
        return None

    def expect_end(self, marker: str) -> None:
        """After the last call: the block's end marker, blank text around it, and what follows is content."""
        if self.stopped_at is None or self.stopped_at >= len(self.text):
            return
        start = self.stopped_at
        while start < len(self.text) and self.text[start].isspace():
            start += 1
        if self.text.startswith(marker, start):
            self.stopped_at = start + len(marker)
            while self.stopped_at < len(self.text) and self.text[self.stopped_at].isspace():
                self.stopped_at += 1
        elif not self.is_final and marker.startswith(self.text[start:]):
            self.stopped_at = len(self.text)

    def until(self, terminator: str) -> str | None:
        """The text up to `terminator`, which is consumed; None (and the scan stops) when it is not there yet."""
        if self.stopped_at is not None:
            return None
        end = self.text.find(terminator, self.pos)
        if end < 0:
            self.stopped_at = len(self.text) if not self.is_final else self.pos
            return None
        value, self.pos = self.text[self.pos:end], end + len(terminator)
        return value

    def until_or_rest(self, terminator: str) -> tuple[str, bool]:
        """The text up to `terminator` and True; without one, what there is so far (less a tail that could be the
        start of the terminator while the text grows) and False."""
        end = self.text.find(terminator, self.pos)
        if end >= 0:
            value, self.pos = self.text[self.pos:end], end + len(terminator)
            return value, True
        value = self.text[self.pos:]
        if not self.is_final:
            value = value[: len(value) - _partial_suffix(value, terminator)]
        self.pos = self.stopped_at = len(self.text)
        return value, False


def _held_content(text: str, marker: str, is_final: bool) -> str:
    """Content with no calls block (yet): all of it when final, else less a tail that could open the block."""
    if is_final:
        return text
    text = text[: len(text) - _partial_suffix(text, marker)]
    return text.rstrip()  # blank text may still precede the calls, which drop it


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
