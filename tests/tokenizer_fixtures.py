"""Tiny Hugging Face tokenizers made in the tests (no hub downloads).

Each builder trains a small `tokenizers` model on a few KB of text, wraps it in the transformers 5
class a real model of that kind would use, and saves it with `save_pretrained` into a folder, so
the exporter sees exactly what it would see in a downloaded checkpoint. Used by the export and
the runtime tokenizer tests (the runtime tests load this file by path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

# A few KB of mixed text so that merges cover words, indentation, CJK and emoji bytes.
_CORPUS = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class Point:\n\tdef __init__(self, x, y):\n\t\tself.x = x\n\t\tself.y = y\n",
    "The quick brown fox jumps over the lazy dog. Hello, world! It's 2024; isn't it?",
    "Café, naïve, résumé, façade, Ångström, jalapeño, São Paulo, Zürich.",
    "你好，世界！今天天气很好。日本語のテキストです。한국어 텍스트.",
    "Emoji: 🙂 🚀 👍🏽 👩‍💻 🇫🇷 ✨ — and some math: α + β = γ, 3.14159.",
    "    indented line\n\n\n\ttab\t\tseparated\r\nwindows line   end   ",
]
CORPUS = [line for _ in range(12) for line in _CORPUS]


def _train_bpe(vocab_size: int, pre_tokenizer, *, byte_fallback=False, special=(), alphabet=()):
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE(byte_fallback=byte_fallback, unk_token=None if not byte_fallback else "<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                  initial_alphabet=list(alphabet), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _vocab_merges(tok) -> tuple[dict[str, int], list[tuple[str, str]]]:
    import json

    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def make_gpt2(out: Path) -> Path:
    """GPT-2 style: byte-level BPE, no BOS added, <|endoftext|> as bos/eos/unk."""
    from tokenizers import decoders, pre_tokenizers
    from transformers import GPT2Tokenizer

    tok = _train_bpe(400, pre_tokenizers.ByteLevel(add_prefix_space=False), special=["<|endoftext|>"],
                     alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.decoder = decoders.ByteLevel()
    vocab, merges = _vocab_merges(tok)
    hf = GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="<|endoftext|>",
                       eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    hf.save_pretrained(out)
    return out


def make_llama(out: Path) -> Path:
    """Llama/Mistral style: SentencePiece-like BPE over ▁-marked text with byte fallback, BOS added."""
    from tokenizers import pre_tokenizers
    from transformers import LlamaTokenizer

    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    # Trained like SentencePiece: pieces start with ▁ and never span a newline (Llama 2 and
    # Mistral spell "\n" as <0x0A>); LlamaTokenizer then encodes with Metaspace(split=False),
    # as the real Llama tokenizer.json does.
    words = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)])
    tok = _train_bpe(600, words, byte_fallback=True, special=["<unk>", "<s>", "</s>", *bytes_])
    vocab, merges = _vocab_merges(tok)
    hf = LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                        add_bos_token=True)
    hf.save_pretrained(out)
    return out


def make_qwen2(out: Path) -> Path:
    """Qwen2 style: byte-level BPE with the Qwen2 split regex and NFC, no BOS."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # Trained with Qwen2's own split (single digits, punctuation glued to letters) so that its
    # merges differ from what GPT-2's regex would produce.
    split = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok = _train_bpe(500, split, special=["<|endoftext|>"], alphabet=pre_tokenizers.ByteLevel.alphabet())
    vocab, merges = _vocab_merges(tok)
    hf = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                        eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    hf.save_pretrained(out)
    return out


def make_unigram(out: Path) -> Path:
    """SentencePiece Unigram (T5/ALBERT-like) saved as a plain tokenizers-backed tokenizer with BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>", "<s>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>", pad_token="<pad>")
    hf.save_pretrained(out)
    return out


def make_lowercase_bpe(out: Path) -> Path:
    """Byte-level BPE behind a Lowercase normalizer: tokenizer.json can say it, ort-extensions can't."""
    from tokenizers import decoders, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(350, pre_tokenizers.ByteLevel(add_prefix_space=False), special=["<|endoftext|>"],
                     alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.normalizer = normalizers.Lowercase()
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    hf.save_pretrained(out)
    return out


def make_wordpiece(out: Path) -> Path:
    """BERT-style WordPiece: a model type with no JSON-driven op in ort-extensions."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=300, show_progress=False,
                                                              special_tokens=["[UNK]", "[SEP]"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[SEP]")
    hf.save_pretrained(out)
    return out


# name -> builder, for the tokenizer kinds a causal LM ships and that the exporter must handle.
KINDS: dict[str, Callable[[Path], Path]] = {
    "gpt2": make_gpt2,
    "llama": make_llama,
    "qwen2": make_qwen2,
    "unigram": make_unigram,
}


def make_text_llama(out: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64) over make_llama's tokenizer, saved into `out`: a checkpoint
    the CLI tests export, inspect and generate text from."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = make_llama(out)
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, initializer_range=0.2)
    LlamaForCausalLM(config).eval().save_pretrained(src)
    return src
