"""A tiny Llama with a trained tokenizer and a chat template, exported for tests/serve."""

from __future__ import annotations

import pytest

from core.test_cli_end_to_end import text_bundle  # noqa: F401 - the HF folder chat_bundle edits

# Llama-2 style: [INST] around user turns, BOS written by the template itself
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
                 "{{ m['content'] }} [/INST]{% elif m['role'] == 'system' %}<<SYS>>"
                 "{{ m['content'] }}<</SYS>>{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
                 "{% endfor %}")


@pytest.fixture(scope="module")
def chat_bundle(text_bundle, tmp_path_factory):  # noqa: F811
    """(HF tokenizer, exported bundle): the end-to-end model, its tokenizer given CHAT_TEMPLATE."""
    from transformers import AutoTokenizer

    from arx.cli import main

    src, _ = text_bundle
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(src)
    out = tmp_path_factory.mktemp("serve") / "tiny.arx"
    assert main(["export", str(src), "-o", str(out), "-q"]) == 0
    return tok, out
