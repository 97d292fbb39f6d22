"""A model's own chat template (jinja2, from a GGUF or tokenizer_config.json), rendered as Hugging Face does.

Templates are code that came with the model file, so they run in jinja2's immutable sandbox, with
the environment transformers' `apply_chat_template` gives them: blocks trimmed, loop controls,
a `tojson` that keeps non-ASCII text, `raise_exception` and `strftime_now`.
"""
from __future__ import annotations

import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import UserError


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: object, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled template; `render` gives the prompt text, special tokens spelled out, ready to tokenize."""

    def __init__(self, source: str, where: str, origin: str):
        """`where`: the file (and key) it came from, for errors; `origin`: the key alone, for reports."""
        self.source, self.where, self.origin = source, where, origin
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"the chat template in {where} is not valid jinja2 ({e.message}, template line "
                            f"{e.lineno}); fix the template or use a copy of the model with a working one") from None

    def render(self, messages: list[dict], special_tokens: dict[str, str]) -> str:
        """The conversation `messages` ending with the prompt for the assistant's reply
        (`add_generation_prompt`); `special_tokens` such as bos_token, eos_token are visible by name."""
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=True, **special_tokens)
        except jinja2.TemplateError as e:  # raise_exception, undefined names, sandbox refusals
            raise UserError(f"the chat template in {self.where} failed to render a conversation ({e}); fix the "
                            "template or use a copy of the model with a working one") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
            raise UserError(f"the chat template in {self.where} failed to render a conversation "
                            f"({type(e).__name__}: {e}); fix the template or use a copy of the model with a "
                            "working one") from None
