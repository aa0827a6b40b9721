"""tokenizer.json + tokenizer_config.json (special tokens, chat template) + generation_config.json (sampling defaults)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from dsserve.errors import ConfigError, InvalidRequestError


class Tokenizer:
    """Encode, decode and render chat templates the way transformers does, with the `tokenizers` library only."""

    def __init__(self, folder: str | Path, chat_template: str | None = None):
        folder = Path(folder)
        self.folder = folder
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.exists():
            raise ConfigError(
                f"{tokenizer_file} is missing; copy the checkpoint's tokenizer.json there "
                "(or send prompt_token_ids, which need no tokenizer)"
            )
        try:
            self._tok = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:
            raise ConfigError(f"{tokenizer_file} cannot be loaded ({e}); download it again") from e
        self.config = _read_json(folder / "tokenizer_config.json")
        self.generation_config = _read_json(folder / "generation_config.json")
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.pad_token = _token_text(self.config.get("pad_token")) or self.eos_token
        self.add_bos_token = bool(self.config.get("add_bos_token", False))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.chat_template = chat_template or _find_chat_template(folder, self.config)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # Skipping special tokens keeps those that carry an answer's structure, which the tool and reasoning parsers
        # read (V3.2's tokenizer.json marks ｜DSML｜ special: sglang #16122; a checkpoint may mark the others so too).
        added = self._tok.get_added_tokens_decoder()
        special = {i for i, token in added.items() if token.special}
        self.special_markers = {added[i].content: i for i in special if any(m in added[i].content for m in _MARKERS)}
        self._skipped_special_ids = frozenset(special - set(self.special_markers.values()))  # empty: no marker special

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        _check_unicode(text)
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens and self.special_markers:
            ids, skip_special_tokens = [i for i in ids if i not in self._skipped_special_ids], False
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """tokenizer.json as the `tokenizers` library serialises it (what llguidance reads)."""
        return self._tok.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def eos_token_ids(self, config_eos: tuple[int, ...]) -> tuple[int, ...]:
        """EOS ids from generation_config.json (the R1 distills list several), config.json and the tokenizer."""
        ids: list[int] = list(config_eos)
        gen = self.generation_config.get("eos_token_id")
        ids += gen if isinstance(gen, list) else ([gen] if gen is not None else [])
        if self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return tuple(dict.fromkeys(int(i) for i in ids))

    def sampling_defaults(self) -> dict[str, Any]:
        keys = ("temperature", "top_p", "top_k", "do_sample", "repetition_penalty")
        return {k: self.generation_config[k] for k in keys if k in self.generation_config}

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        template_kwargs: dict[str, Any] | None = None,
        **extra: Any,
    ) -> str:
        """`template_kwargs` (a request's chat_template_kwargs) and `extra` become template variables."""
        extra = {**extra, **(template_kwargs or {})}
        template = chat_template or self.chat_template
        if template is None:
            raise InvalidRequestError(
                "this model's tokenizer has no chat template; the server's operator can give one with "
                "--chat-template FILE, or send a plain completion prompt"
            )
        reserved = sorted(set(extra) & _TEMPLATE_NAMES)
        if reserved:
            raise InvalidRequestError(f"chat_template_kwargs may not set {', '.join(reserved)}: the server sets "
                                      "them", param="chat_template_kwargs")
        # Keys with null values are dropped: R1's template tests `'tool_calls' in message`.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return _compile(template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"the chat template rejected these messages: {e}") from e
        except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as e:
            # a template computing with a value of the request's (chat_template_kwargs, message fields)
            raise InvalidRequestError(f"the chat template failed on these messages ({type(e).__name__}); check "
                                      "chat_template_kwargs and the message fields") from e

    def template_variables(self, chat_template: str | None = None) -> frozenset[str]:
        """The variables the chat template reads besides the messages (`thinking`, `tools`, `reasoning_effort`...),
        and "reasoning_content" when it reads that message field: what a request may pass to it."""
        template = chat_template or self.chat_template
        if template is None:
            return frozenset()
        if template not in _VARIABLES_CACHE:
            names = set(jinja2.meta.find_undeclared_variables(_environment().parse(template)))
            if "reasoning_content" in template:
                names.add("reasoning_content")
            _VARIABLES_CACHE[template] = frozenset(names)
        return _VARIABLES_CACHE[template]

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> list[int]:
        """The rendered template already holds BOS: tokenize without adding special tokens (as transformers does)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **extra), add_special_tokens=False)


_TEMPLATE_CACHE: dict[str, jinja2.Template] = {}
_VARIABLES_CACHE: dict[str, frozenset[str]] = {}


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    return env


def _compile(source: str) -> jinja2.Template:
    if source not in _TEMPLATE_CACHE:
        _TEMPLATE_CACHE[source] = _environment().from_string(source)
    return _TEMPLATE_CACHE[source]


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _find_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default") or next(iter(named.values()), None)
    return template


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except PermissionError as e:
        raise ConfigError(f"{path} is not readable ({e.strerror}); fix with: chmod a+r {path}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from e


def _token_text(token: Any) -> str | None:
    if isinstance(token, dict):  # AddedToken serialised by transformers
        return token.get("content")
    return token


# Kept by decoding when special: DeepSeek's tool markers (<｜tool▁sep｜>...), V3.2's ｜DSML｜, R1's <think> / </think>.
_MARKERS = ("｜tool▁", "｜DSML｜", "<think>", "</think>")

_TEMPLATE_NAMES = {"messages", "add_generation_prompt", "bos_token", "eos_token", "chat_template"}


def _check_unicode(text: str) -> None:
    """Text from JSON may hold lone surrogates ("\\ud800"), which are not Unicode text the tokenizer can take."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(f"the text holds a lone surrogate (U+{ord(text[e.start]):04X}) at character "
                                  f"{e.start}, which is not valid Unicode; send characters, or valid surrogate pairs",
                                  param="messages") from None
