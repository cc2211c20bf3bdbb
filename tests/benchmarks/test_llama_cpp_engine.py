"""benchmarks/llama_cpp_engine.py and llama.cpp in bench_decode: the vocabulary mapping, variant
and argument handling run without llama_cpp; the conversion, tokenizer and greedy decode run
only where llama-cpp-python is installed and $ARX_LLAMA_CPP_SRC names its converter."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench_scripts import import_script, load_script


@pytest.fixture(scope="module")
def eng():
    return load_script("llama_cpp_engine")


@pytest.fixture(scope="module")
def bench():
    return import_script("bench_decode")


def _bpe(word: str, merges: list[str]) -> list[str]:
    """Rank-ordered BPE on one word, as llama.cpp runs it (lowest-rank adjacent pair first)."""
    ranks = {tuple(m.split(" ", 1)): i for i, m in enumerate(merges)}
    syms = list(word)
    while True:
        pairs = [(ranks[p], i) for i, p in enumerate(zip(syms, syms[1:])) if p in ranks]
        if not pairs:
            return syms
        _, i = min(pairs)
        syms[i:i + 2] = [syms[i] + syms[i + 1]]


def test_prefix_merges_rebuild_every_word(eng):
    words = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, 512)]
    types = [3, 3, 3] + [1] * (len(words) - 3)  # gguf TokenType CONTROL, NORMAL
    merges = eng.prefix_merges(words, types)
    assert merges[:3] == ["t 3", "t 4", "t 5"] and "t1 2" in merges and "t12 3" in merges
    assert not any("<" in m for m in merges)  # control tokens are never text
    assert len(merges) == len(set(merges))
    for w in words[3:]:
        assert _bpe(w, merges) == [w]
    assert eng.prompt_text([3, 17, 511]) == "t3 t17 t511"


def test_variants_follow_the_arx_variants(eng):
    assert eng.variants_for(("fp32",)) == ["f16"]
    assert eng.variants_for(("fp32", "w8")) == ["f16", "q8_0"]
    assert eng.variants_for(("w4-kv8",)) == ["f16", "q4_0", "q4_0-kv8"]
    assert all(eng.VARIANTS[v][0] in eng.WEIGHTS for v in eng.VARIANTS)


def test_converter_dir_accepts_the_sdist_or_its_llama_cpp(eng, tmp_path, monkeypatch):
    monkeypatch.delenv(eng.SRC_ENV, raising=False)
    with pytest.raises(SystemExit, match=eng.SRC_ENV):
        eng.converter_dir("")
    with pytest.raises(SystemExit, match="no convert_hf_to_gguf.py"):
        eng.converter_dir(str(tmp_path))
    llama = tmp_path / "vendor" / "llama.cpp"
    (llama / "gguf-py").mkdir(parents=True)
    (llama / "convert_hf_to_gguf.py").write_text("")
    assert eng.converter_dir(str(tmp_path)) == llama
    monkeypatch.setenv(eng.SRC_ENV, str(llama))
    assert eng.converter_dir(None) == llama


def test_engine_arguments(eng, tmp_path):
    with pytest.raises(ValueError, match="KV cache type q4"):
        eng.LlamaCppEngine(tmp_path / "m.gguf", 1, kv_cache="q4")
    cmd = eng.server_command(Path("m.gguf"), 8080, 2, 256, "q8_0")
    opt = dict(zip(cmd[3::2], cmd[4::2]))
    assert opt["--host"] == "127.0.0.1" and opt["--type_k"] == opt["--type_v"] == "8"
    assert opt["--n_ctx"] == "256" and opt["--n_threads"] == "2"
    assert opt["--interrupt_requests"] == "false"  # queued, not cut off by the next request


def test_bench_plan_skips_with_a_line(bench, monkeypatch):
    monkeypatch.setattr(bench.llama_cpp_engine, "available", lambda: False)
    cfg = bench.BenchConfig(shape="tiny", variants=("fp32", "w4-kv8"))
    run, skipped = bench.llama_plan(cfg)
    assert run == [] and "llama_cpp does not import" in skipped[0]
    monkeypatch.setattr(bench.llama_cpp_engine, "available", lambda: True)
    run, skipped = bench.llama_plan(cfg)  # tiny: head dim 16, no q8_0 cache
    assert run == ["f16", "q4_0"] and "q4_0-kv8: skipped" in skipped[0] and "16" in skipped[0]
    assert bench.llama_plan(bench.BenchConfig(shape="tiny", engines=("arx",))) == ([], [])


def test_token_check_names_quantized_weights(bench):
    T = bench.Target
    ref = T("hf-eager", "fp32", Path("."), tokens=[5, 6, 7, 8])
    rows = [ref, T("arx", "fp32", Path("."), tokens=[5, 6, 7, 8]),
            T("arx", "w4", Path("."), tokens=[1, 1, 1, 1]),
            T("llama.cpp", "f16", Path("."), tokens=[5, 6, 9, 8]),
            T("llama.cpp", "q4_0-kv8", Path("."), tokens=[5, 1, 1, 1])]
    got = bench.token_check(rows)
    assert set(got) == {"arx fp32", "llama.cpp f16", "llama.cpp q4_0-kv8"}
    assert got["arx fp32"]["equal"] and got["llama.cpp f16"]["matches"] == 3
    assert got["llama.cpp f16"]["first_difference"] == 2 and got["llama.cpp f16"]["weights"] is None
    assert got["llama.cpp q4_0-kv8"]["weights"] == "q4_0"
    assert bench._verdict(got["llama.cpp q4_0-kv8"]).startswith("differs, q4_0 weights (1/4 equal")
    assert bench.token_check(rows[3:]) == {}  # no HF, no arx fp32: no reference


# --- with llama-cpp-python and its converter ---------------------------------------------

def _src(eng) -> str:
    src = os.environ.get(eng.SRC_ENV, "")
    if not src:
        pytest.skip(f"${eng.SRC_ENV} (llama.cpp's converter) is not set")
    return src


@pytest.fixture(scope="module")
def hd32(eng, tmp_path_factory):
    """A tiny Llama with head dim 32 (a q8_0 cache needs it), its GGUF files, the HF folder."""
    pytest.importorskip("llama_cpp")
    src = _src(eng)
    bench_models = load_script("bench_models")
    shape = bench_models.ModelShape(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=112,
                                    vocab=512, max_positions=512, init_range=0.25)
    cache = tmp_path_factory.mktemp("llama")
    hf = bench_models.hf_folder(shape, cache)
    files = eng.gguf_files(hf, ["f16", "q4_0"], shape.vocab, src=src, log=cache / "log", threads=1)
    return hf, files


def test_gguf_tokenizes_like_the_benchmark_tokenizer(eng, hd32):
    import llama_cpp

    _, files = hd32
    llm = llama_cpp.Llama(str(files["f16"]), n_ctx=32, n_threads=1, verbose=False)
    try:
        ids = [3, 17, 99, 100, 511, 42]
        assert llm.tokenize(eng.prompt_text(ids).encode(), add_bos=True) == ids  # no BOS added
        assert llm.n_vocab() == 512
    finally:
        llm.close()


def test_f16_greedy_equals_hf_and_caches_run(eng, hd32):
    import decode_engines

    hf, files = hd32
    prompt, n = [7, 300, 12, 99, 5, 260, 41, 8], 8
    ref = decode_engines.HfEngine(hf, 1).run(prompt, n).tokens
    for weights, kv in (("f16", "f16"), ("f16", "q8_0"), ("q4_0", "q8_0")):
        e = eng.LlamaCppEngine(files[weights], 1, kv_cache=kv, n_ctx=len(prompt) + n)
        try:
            first, again = e.run(prompt, n), e.run(prompt, n)
        finally:
            e.close()
        assert len(first.tokens) == n and first.ttft_s > 0 and first.decode_tokens_per_s > 0
        assert again.tokens == first.tokens  # a second run is not fed the first one's cache
        if (weights, kv) == ("f16", "f16"):
            assert first.tokens == ref


def test_bench_decode_runs_llama_cpp(eng, bench, tmp_path, capsys):
    """bench_decode with engine llama.cpp on the tiny shape: the f16 row, its token check, and
    the q4_0-kv8 skip line (head dim 16)."""
    pytest.importorskip("llama_cpp")
    _src(eng)
    rc = bench.main(["--shape", "tiny", "--runs", "1", "--warmup", "0", "--prompt-len", "8",
                     "--new-tokens", "6", "--threads", "1", "--engines", "hf-eager,llama.cpp",
                     "--variants", "fp32,w4-kv8", "--cache-dir", str(tmp_path), "--quiet",
                     "--json", str(tmp_path / "b.json")])
    assert rc == 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert set(report["results"]) == {"hf-eager fp32", "llama.cpp f16", "llama.cpp q4_0"}
    assert report["results"]["llama.cpp q4_0"]["decode_tokens_per_s"] > 0
    assert report["tokens_vs_hf"]["llama.cpp f16"]["compared"] == 6
    assert report["tokens_vs_hf"]["llama.cpp q4_0"]["weights"] == "q4_0"
    assert any("q4_0-kv8: skipped" in line for line in report["skipped"])
    out = capsys.readouterr().out
    assert "greedy tokens llama.cpp f16 vs hf-eager fp32" in out and "q4_0-kv8: skipped" in out
