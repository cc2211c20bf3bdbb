"""The decode loops the benchmark compares, timed the same way.

Every engine runs one greedy generation of `new_tokens` tokens after a `prompt` (batch 1, EOS
disabled) and reports timestamps taken as each token becomes available to the caller:

    t0 ── prefill ── token 1 ── step ── token 2 ── ... ── token N
    ttft = token 1 - t0        decode tokens/s = (N - 1) / (token N - token 1)

so prefill, per-step overheads (feeds, sampling, Python) and the graph all count the same way
for arx, Hugging Face eager, onnxruntime-genai and llama.cpp (llama_cpp_engine.py). Threads: the
same intra-op thread count for the ONNX Runtime sessions, torch and llama.cpp.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class RunTiming:
    ttft_s: float
    decode_tokens_per_s: float
    tokens: list[int]


def _timing(t0: float, stamps: list[float], tokens: list[int]) -> RunTiming:
    n = len(stamps)
    tps = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else 0.0
    return RunTiming(stamps[0] - t0, tps, tokens)


class ArxEngine:
    """arx's runtime (numpy + onnxruntime) on a bundle."""

    def __init__(self, bundle: Path, threads: int):
        from arx.runtime.backend import BackendOptions
        from arx.runtime.decoder import DecoderSession

        self.session = DecoderSession(bundle, BackendOptions(device="cpu", intra_op_threads=threads))

    def run(self, prompt: list[int], new_tokens: int) -> RunTiming:
        from arx.runtime.generate import GenerateOptions, generate
        from arx.runtime.sampler import SamplingOptions

        stamps: list[float] = []
        opts = GenerateOptions(max_new_tokens=new_tokens, stop_on_eos=False,
                               sampling=SamplingOptions(do_sample=False))
        t0 = time.perf_counter()
        result = generate(self.session, [prompt], opts,
                          on_token=lambda _b, _t: stamps.append(time.perf_counter()))
        return _timing(t0, stamps, result.tokens[0])

    def close(self) -> None:
        self.session.backend.close()


class _Stamps:
    """A transformers streamer that only stamps the time of each token put (the first put is
    the prompt; assisted generation puts several tokens at once, each gets the put's time)."""

    def __init__(self):
        self.stamps: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.stamps.extend([time.perf_counter()] * int(value.numel()))

    def end(self) -> None:
        pass


class HfEngine:
    """Hugging Face transformers, eager attention, `model.generate` greedy with its KV cache."""

    def __init__(self, folder: Path, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager").eval()
        self.extra: dict = {}  # more generate() arguments (bench_speculative: assistant_model)

    def run(self, prompt: list[int], new_tokens: int) -> RunTiming:
        torch = self.torch
        ids = torch.tensor([prompt], dtype=torch.long)
        streamer = _Stamps()
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, use_cache=True, eos_token_id=None,
                                      pad_token_id=0, streamer=streamer, **self.extra)
        return _timing(t0, streamer.stamps[:new_tokens], out[0, len(prompt):].tolist())

    def close(self) -> None:
        self.model = None


class OrtGenaiEngine:
    """onnxruntime-genai's Generator loop on a model-builder folder."""

    def __init__(self, folder: Path, threads: int):
        import onnxruntime_genai as og

        config = og.Config(str(folder))
        config.overlay(json.dumps(
            {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.og = og
        self.model = og.Model(config)

    def run(self, prompt: list[int], new_tokens: int) -> RunTiming:
        og = self.og
        params = og.GeneratorParams(self.model)
        total = len(prompt) + new_tokens
        # min_length = max_length: EOS cannot end the run early (it is masked until then)
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(self.model, params)
        stamps, tokens = [], []
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray([prompt], dtype=np.int32))  # runs the prefill
        while not gen.is_done():
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
            stamps.append(time.perf_counter())
        return _timing(t0, stamps, tokens)

    def close(self) -> None:
        self.model = None


def _llama_cpp(path: Path, threads: int, **options):
    """llama_cpp_engine.LlamaCppEngine, imported when made (it imports this module for
    RunTiming, and llama_cpp only when an engine is made)."""
    from llama_cpp_engine import LlamaCppEngine

    return LlamaCppEngine(path, threads, **options)


ENGINES = {"arx": ArxEngine, "hf-eager": HfEngine, "ort-genai": OrtGenaiEngine,
           "llama.cpp": _llama_cpp}
