"""Counting a row's tokens in the launcher, as the training program's tokenizer will, without the
torch stack: the model's tokenizer.json through the `tokenizers` package, its chat template through
jinja2 in the environment transformers renders it in (a sandbox, trim_blocks and lstrip_blocks, loop
controls, raise_exception, strftime_now, tojson, and {% generation %} blocks), the special tokens of
its tokenizer_config.json. Rendered chats are tokenized without adding special tokens, as
transformers' apply_chat_template does (the template writes them); text with them.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer

from entrypoint.hub import TokenizerFiles

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Generation(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: marks the assistant's tokens for transformers' masks;
    rendered here as its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def _content(token: Any) -> str | None:
    """A special token as tokenizer_config.json holds it: text, or an AddedToken's {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token if isinstance(token, str) else None


class LocalTokenizer:
    def __init__(self, files: TokenizerFiles) -> None:
        self.folder = files.folder
        self.tokenizer = Tokenizer.from_str(files.tokenizer_json)
        self.template, self.template_error = None, ""
        try:
            self.template = compile_template(files.chat_template) if files.chat_template else None
        except jinja2.TemplateError as exc:  # a template transformers' own jinja environment may still take
            self.template_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        self.special = {name: _content(files.config.get(name)) for name in SPECIAL_TOKENS}

    def text(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> int:
        """The chat's tokens as the chat template renders it; TemplateError when the template refuses it."""
        assert self.template is not None
        rendered = self.template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
            **{k: v for k, v in self.special.items() if v is not None},
        )  # fmt: skip
        return len(self.tokenizer.encode(rendered, add_special_tokens=False).ids)
