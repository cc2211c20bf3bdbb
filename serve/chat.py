"""Chat messages -> prompt ids with the model's own chat template, rendered as transformers does.

`arx export` writes the tokenizer's template as `chat_template.jinja` in the bundle (tokenizer.json
does not carry it); a `chat_template` key of a tokenizer_config.json placed in the bundle is read
too. The template is rendered in jinja2's sandbox with the options and helpers of transformers'
`apply_chat_template` (trim_blocks, lstrip_blocks, `raise_exception`, `tojson`), and the text is
tokenized without adding BOS: the templates write it themselves, as HF's tokenization does.
"""

from __future__ import annotations

import json
from pathlib import Path

from arx.errors import ArxError, require

TEMPLATE_FILE = "chat_template.jinja"


def load_template(bundle: Path) -> str | None:
    """The bundle's chat template, or None when it has none."""
    path = Path(bundle) / TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    config = Path(bundle) / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
        return template if isinstance(template, str) else None
    return None


class ChatTemplate:
    def __init__(self, source: str, tokenizer):
        jinja2 = require("jinja2", "serve", "chat templates of arx serve")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ArxError(f"the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False,
                                                                        indent=indent)
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ArxError(f"the bundle's chat template does not parse ({e}); fix "
                           f"{TEMPLATE_FILE} in the bundle or re-export it") from e
        self.tokenizer = tokenizer
        self.special = {"bos_token": _token(tokenizer, tokenizer.bos_token_id),
                        "eos_token": _token(tokenizer, (tokenizer.eos_token_ids or (None,))[0])}

    def render(self, messages: list[dict]) -> str:
        import jinja2

        try:
            return self.template.render(messages=messages, add_generation_prompt=True,
                                        **self.special)
        except jinja2.TemplateError as e:
            raise ArxError(f"the chat template failed on these messages ({e})") from e

    def encode(self, messages: list[dict]) -> list[int]:
        text = self.render(messages)
        return list(self.tokenizer.backend.encode(text, add_special_tokens=False).ids)


def _token(tokenizer, token_id: int | None) -> str:
    if token_id is None:
        return ""
    return tokenizer.backend.id_to_token(int(token_id)) or ""
