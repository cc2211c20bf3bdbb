"""llama.cpp as a peer of the decode and serving benchmarks (issues 16 and 11), on the same random
weights as every other engine:

    HF folder ─► GGUF f16 (llama.cpp's converter, a child) ─┬─► q8_0 ┐ llama_model_quantize
    (bench_models, cached)   hf-<key>-f16.gguf               └─► q4_0 ┘ (llama.cpp's C API)

The GGUF files are cached beside the HF folder. The engine times llama-cpp-python's own greedy
loop (`Llama.generate`) the way decode_engines times the others. Needs the `llamacpp` extra
(llama-cpp-python, built from source: README, Install) and llama.cpp's converter, which ships only
in llama-cpp-python's source archive: --llama-cpp-src or ARX_LLAMA_CPP_SRC names that archive's
unpacked folder (or its vendor/llama.cpp, or a llama.cpp checkout).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_engines import RunTiming, _timing  # noqa: E402

# variant -> (GGUF weights, KV cache type); q4_0-kv8 is arx w4-kv8's counterpart (q8_0 cache)
VARIANTS = {"f16": ("f16", "f16"), "q8_0": ("q8_0", "f16"), "q4_0": ("q4_0", "f16"),
            "q4_0-kv8": ("q4_0", "q8_0")}
WEIGHTS = ("f16", "q8_0", "q4_0")
SRC_ENV = "ARX_LLAMA_CPP_SRC"
# a word-level vocabulary's words are BPE merges of their own prefixes (prefix_merges)
_WORD_TYPES = (1,)  # gguf.TokenType.NORMAL


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def variants_for(arx_variants) -> list[str]:
    """The llama.cpp variants that are counterparts of the arx variants asked for: f16 always
    (the float peer, whose greedy tokens are compared), q8_0 for w8, q4_0 with both caches for
    any w4 variant (the issue compares arx w4 per cache dtype with q4_0 per cache type)."""
    out = ["f16"]
    if "w8" in arx_variants:
        out.append("q8_0")
    if any(v.startswith("w4") for v in arx_variants):
        out += ["q4_0", "q4_0-kv8"]
    return out


def converter_dir(src: str | None = None) -> Path:
    """The folder holding llama.cpp's convert_hf_to_gguf.py, its conversion/ package and gguf-py,
    from `src` or $ARX_LLAMA_CPP_SRC (the sdist root or its vendor/llama.cpp)."""
    given = src or os.environ.get(SRC_ENV, "")
    if not given:
        raise SystemExit(
            f"llama.cpp's converter is not found: set {SRC_ENV} (or --llama-cpp-src) to the "
            "unpacked source of llama-cpp-python==0.3.36 (pip download --no-deps --no-binary :all: "
            "llama-cpp-python==0.3.36, then tar xf), or leave llama.cpp out of --engines")
    for folder in (Path(given), Path(given) / "vendor" / "llama.cpp"):
        if (folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf-py").is_dir():
            return folder
    raise SystemExit(f"{given} holds no convert_hf_to_gguf.py with gguf-py (nor does its "
                     f"vendor/llama.cpp): point {SRC_ENV} or --llama-cpp-src at "
                     "llama-cpp-python's unpacked sdist")


def prefix_merges(tokens: list[str], types: list[int]) -> list[str]:
    """BPE merges that rebuild each word of a word-level vocabulary from its characters:
    "t123" gives "t 1", "t1 2", "t12 3". With llama.cpp's whitespace pre-tokenizer, text of
    space-separated words then tokenizes to the words' ids. Exact when no word starts inside
    another (the benchmark's t<i> words all start with t), as only a word's own prefix chain
    can then merge; control tokens and words with whitespace are left out (never produced)."""
    merges: dict[str, None] = {}
    for tok, kind in zip(tokens, types):
        if kind not in _WORD_TYPES or len(tok) < 2 or any(c.isspace() for c in tok):
            continue
        for k in range(1, len(tok)):
            merges[f"{tok[:k]} {tok[k]}"] = None
    return list(merges)


def prompt_text(ids: list[int]) -> str:
    """The benchmark tokenizer's text of token ids (bench_models.write_word_tokenizer: id i is
    the word t<i>), for llama.cpp's server, which takes text prompts only."""
    return " ".join(f"t{i}" for i in ids)


def gguf_files(hf: Path, weights: list[str], vocab: int, *, src: str | None, log: Path,
               threads: int) -> dict[str, Path]:
    """{weights: GGUF file} beside `hf`, made once: f16 by the converter, the rest quantized
    from it (q4_0 as llama-quantize makes it: output.weight q6_K, or q8_0 where rows do not
    fit its 256-blocks)."""
    import bench_models

    f16 = hf.with_name(f"{hf.name}-f16.gguf")
    if not f16.is_file():
        folder = converter_dir(src)
        tok = bench_models._with_tokenizer(hf, vocab)  # the converter loads a tokenizer
        tmp = f16.with_name(f16.name + ".tmp")
        cmd = [sys.executable, str(Path(__file__).resolve()), "convert", str(tok), str(tmp),
               str(folder)]
        with open(log, "ab") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "TQDM_DISABLE": "1"}).returncode
        if rc != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"llama.cpp's converter failed (exit {rc}); see {log}")
        tmp.rename(f16)
    out = {}
    for w in weights:
        if w not in WEIGHTS:
            raise ValueError(f"unknown GGUF weights {w}; known: {', '.join(WEIGHTS)}")
        path = f16 if w == "f16" else hf.with_name(f"{hf.name}-{w}.gguf")
        if not path.is_file():
            quantize(f16, path, w, threads)
        out[w] = path
    return out


def quantize(src: Path, out: Path, weights: str, threads: int) -> None:
    """llama_model_quantize (what the llama-quantize binary calls), written atomically."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
                    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[weights]
    params.nthread = threads
    tmp = out.with_name(out.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize {src.name} -> {weights} failed ({rc})")
    tmp.rename(out)


def _convert(model_dir: Path, out: Path, llama_src: Path) -> None:
    """The converter's model class on the folder, writing f16 (run in a child: it puts
    llama.cpp's packages on sys.path). The benchmark's word-level tokenizer is none of the
    BPE pre-tokenizers the converter knows by hash, so the vocabulary is written as what it
    is: llama.cpp's "whitespace" tokenizer over the same words, with prefix_merges."""
    sys.path[:0] = [str(llama_src), str(llama_src / "gguf-py")]
    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    base = get_model_class(get_model_architecture(ModelBase.load_hparams(model_dir, False),
                                                  ModelType.TEXT), mmproj=False)

    class WordLevel(base):
        model_arch = base.model_arch

        def get_vocab_base_pre(self, tokenizer) -> str:
            return "whitespace"

        def set_vocab(self):
            tokens, types, pre = self.get_vocab_base()
            w = self.gguf_writer
            w.add_tokenizer_model("whitespace")
            w.add_tokenizer_pre(pre)
            w.add_token_list(tokens)
            w.add_token_types(types)
            w.add_token_merges(prefix_merges(tokens, [int(t) for t in types]))
            gguf.SpecialVocab(self.dir_model, load_merges=False).add_to_gguf(w)
            w.add_add_bos_token(False)  # prompts are ids as given, as for arx and HF

    with torch.inference_mode():
        WordLevel(model_dir, gguf.LlamaFileType.MOSTLY_F16, out).write()


class LlamaCppEngine:
    """llama-cpp-python's Llama on a GGUF: greedy, EOS ignored (Llama.generate never stops on
    it), the KV cache f16 (llama.cpp's default) or q8_0. Flash attention is on for both
    caches: a quantized V cache needs it, and llama.cpp's own default (auto) picks it on CPU."""

    def __init__(self, path: Path, threads: int, *, kv_cache: str = "f16", n_ctx: int = 2048):
        if kv_cache not in ("f16", "q8_0"):
            raise ValueError(f"unknown llama.cpp KV cache type {kv_cache}; known: f16, q8_0")
        try:
            import llama_cpp
        except ImportError as e:
            raise RuntimeError("engine llama.cpp needs llama-cpp-python: pip install "
                               "'arx[llamacpp]' with the CMAKE_ARGS of README, Install") from e
        kv = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}[kv_cache]
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, type_k=kv, type_v=kv,
                                   flash_attn=True, verbose=False)

    def run(self, prompt: list[int], new_tokens: int) -> RunTiming:
        # reset: n_tokens 0, so generate neither reuses the last run's prompt from the cache
        # nor skips its prefill
        self.llm.reset()
        stamps, tokens = [], []
        t0 = time.perf_counter()
        gen = self.llm.generate([int(t) for t in prompt], top_k=1, temp=0.0, repeat_penalty=1.0)
        try:
            for tok in gen:
                stamps.append(time.perf_counter())
                tokens.append(int(tok))
                if len(tokens) == new_tokens:
                    break
        finally:
            gen.close()
        return _timing(t0, stamps, tokens)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


def server_command(path: Path, port: int, threads: int, n_ctx: int,
                   kv_cache: str = "f16") -> list[str]:
    """llama-cpp-python's OpenAI server (the [server] extra) on the GGUF, on 127.0.0.1. It runs
    one request at a time; --interrupt_requests false queues the others (its default ends the
    streaming request when another arrives)."""
    kv = {"f16": 1, "q8_0": 8}[kv_cache]  # GGML_TYPE_F16 / _Q8_0, without importing llama_cpp
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--flash_attn", "true", "--type_k", str(kv),
            "--type_v", str(kv), "--model_alias", "bench", "--verbose", "false",
            "--interrupt_requests", "false"]


if __name__ == "__main__":  # the conversion child: convert MODEL_DIR OUT LLAMA_SRC
    if len(sys.argv) != 5 or sys.argv[1] != "convert":
        raise SystemExit("usage: llama_cpp_engine.py convert MODEL_DIR OUT.gguf LLAMA_CPP_SRC")
    _convert(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
