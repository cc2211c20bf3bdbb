"""The benchmark's models: random weights of a Llama, Gemma 2 or Mixtral shape made here, and
the artifacts built from them.

    shape ─► HF folder (save_pretrained, cached) ─┬─► arx bundle (export_model; w8/w4 via arx.calibration)
                                                  └─► ort-genai folder (its model builder, fp32 / int4)

The HF folder and the ort-genai builds depend only on the shape and seed, so they are cached;
arx bundles are re-exported on every run (unless asked not to) so the numbers are for this
checkout's exporter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int = 2048
    init_range: float = 0.02  # transformers' default init scale
    family: str = "llama"  # llama | gemma | gemma2 | mixtral (hf_config)
    experts: int = 0  # mixtral: experts per layer (top-2 routing)
    # gemma2: the sliding window of its local layers (0: the config's default, 4096, which
    # onnxruntime-genai refuses in a cache shorter than the window)
    sliding_window: int = 0

    def key(self, seed: int) -> str:
        fields = asdict(self)
        # shapes keep the cache keys they always had while these are at their defaults
        for name in ("family", "experts", "sliding_window"):
            if fields[name] == ModelShape.__dataclass_fields__[name].default:
                del fields[name]
        text = json.dumps({**fields, "seed": seed}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:10]

    def hf_config(self):
        """The transformers config of this shape's family (ids as the benchmark tokenizer's)."""
        import transformers as tf

        common = dict(vocab_size=self.vocab, hidden_size=self.hidden,
                      intermediate_size=self.intermediate, num_hidden_layers=self.layers,
                      num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                      max_position_embeddings=self.max_positions,
                      initializer_range=self.init_range, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
        if self.family == "gemma":  # sqrt(hidden) embedding scale, (1 + w) norms, GeGLU, tied
            return tf.GemmaConfig(**common, head_dim=self.hidden // self.heads)
        if self.family == "gemma2":  # soft-caps, sandwich norms, GeGLU, tied head as Gemma 2
            window = {"sliding_window": self.sliding_window} if self.sliding_window else {}
            return tf.Gemma2Config(**common, head_dim=self.hidden // self.heads,
                                   query_pre_attn_scalar=self.hidden // self.heads, **window)
        if self.family == "mixtral":
            return tf.MixtralConfig(**common, num_local_experts=self.experts,
                                    num_experts_per_tok=2, tie_word_embeddings=False)
        return tf.LlamaConfig(**common, tie_word_embeddings=False)


# ~125M Llama shape of issue 2 item 10 (134M parameters with an untied lm_head), and a tiny one
# for the smoke test. The tiny one uses a larger init so greedy tokens are not decided by
# near-ties (float rounding), as in tests/tiny_models.py.
SHAPES = {
    "125m": ModelShape(hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048, vocab=32000),
    "tiny": ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=112, vocab=512,
                       max_positions=512, init_range=0.25),
    # issue 13's speed rows: a Gemma-2-shaped model (128M, tied head) and a Mixtral-shaped one
    # (8 experts of 896, top-2: 127M in all, about 43M of them read per token)
    "gemma2-125m": ModelShape(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=3072,
                              vocab=32000, family="gemma2"),
    # the same with a 128-token window: it bites inside the 256-token benchmark context, and
    # onnxruntime-genai runs it (it refuses a cache shorter than the window)
    "gemma2-w128-125m": ModelShape(hidden=768, layers=12, heads=12, kv_heads=4,
                                   intermediate=3072, vocab=32000, family="gemma2",
                                   sliding_window=128),
    "gemma-125m": ModelShape(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=3072,
                             vocab=32000, family="gemma"),
    "gemma-tiny": ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=112,
                             vocab=512, max_positions=512, init_range=0.25, family="gemma"),
    "mixtral-125m": ModelShape(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=896,
                               vocab=32000, family="mixtral", experts=8),
    "gemma2-tiny": ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=112,
                              vocab=512, max_positions=512, init_range=0.25, family="gemma2"),
    "mixtral-tiny": ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=112,
                               vocab=512, max_positions=512, init_range=0.25, family="mixtral",
                               experts=4),
}


def hf_folder(shape: ModelShape, cache: Path, seed: int = 0) -> Path:
    """A saved HF model of the shape's family with random weights; made once per (shape, seed)."""
    folder = cache / f"hf-{shape.key(seed)}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    import torch
    import transformers as tf

    cfg = shape.hf_config()
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def parameter_count(folder: Path) -> int:
    from safetensors import safe_open

    n = 0
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        for k in f.keys():
            n += _prod(f.get_slice(k).get_shape())
    return n


def _prod(dims) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out


def write_word_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer over `vocab` ids saved into `folder` (the builder needs one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def _with_tokenizer(hf: Path, vocab: int) -> Path:
    """The model builder insists on loading a tokenizer: a sibling folder with the same weights
    (symlinks) plus a word-level tokenizer over the model's vocabulary."""
    folder = hf.with_name(hf.name + "-tok")
    if (folder / "tokenizer.json").is_file():
        return folder
    folder.mkdir(exist_ok=True)
    write_word_tokenizer(folder, vocab)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        link = folder / name
        if not link.exists():
            link.symlink_to((hf / name).resolve())
    return folder


def ort_genai_folder(hf: Path, vocab: int, precision: str, log: Path) -> Path:
    """onnxruntime-genai's model builder on the same weights (`-p fp32|int4 -e cpu`)."""
    out = hf.with_name(f"{hf.name}-ortgenai-{precision}")
    if (out / "genai_config.json").is_file():
        return out
    src = _with_tokenizer(hf, vocab)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(tmp),
           "-p", precision, "-e", "cpu", "-c", str(hf.parent / "builder-cache")]
    with open(log, "ab") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "TQDM_DISABLE": "1"}).returncode
    if rc != 0:
        raise RuntimeError(f"onnxruntime-genai's model builder failed (exit {rc}); see {log}")
    tmp.rename(out)
    return out


def arx_bundle(hf: Path, out: Path, *, max_seq_len: int, reuse: bool) -> Path:
    """`export_model` on the HF folder (parity against PyTorch checked as always)."""
    if reuse and (out / "arx.json").is_file():
        return out
    from arx.export.exporter import ExportOptions, export_model

    export_model(source=hf, output=out, options=ExportOptions(
        max_seq_len=max_seq_len, overwrite=True, progress=False))
    return out


def arx_quantized(fp32: Path, out: Path, scheme: str, *, reuse: bool, kv_dtype: str = "fp32",
                  **quant) -> Path:
    """A weight-only variant (w8, w4) made by arx.calibration, the path `arx calibrate` takes;
    kv_dtype fp16/int8 gives it that KV cache (`arx calibrate --kv-dtype`), `quant` other
    QuantOptions (group_size, accuracy_level, quantize_lm_head)."""
    if reuse and (out / "arx.json").is_file():
        return out
    try:
        from arx.calibration.calibrator import calibrate_bundle
        from arx.calibration.options import CalibrateOptions, DataOptions, QuantOptions
    except ImportError as e:
        raise RuntimeError(f"--variants {scheme} needs arx.calibration.calibrate_bundle, which "
                           f"this checkout lacks ({e}); run with --variants fp32") from e
    from arx.manifest import read_manifest

    # weight-only schemes need no calibration data; the few random samples only feed the
    # accuracy report, which says nothing for random weights (hence force=True)
    seq_len = min(32, read_manifest(fp32).kv.max_seq_len)
    options = CalibrateOptions(quant=QuantOptions(scheme=scheme, **quant),
                               data=DataOptions(random=True, samples=4, eval_samples=2, seq_len=seq_len),
                               force=True, overwrite=True, progress=False, plot=False,
                               kv_dtype=kv_dtype)
    calibrate_bundle(bundle=fp32, output=out, options=options)
    return out
