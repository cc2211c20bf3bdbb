"""Options of `arx calibrate`: the scheme table (data) and frozen, validated option dataclasses.

Imports nothing heavy: the CLI builds these before deciding whether to load onnx/onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass

from arx.errors import ArxError


@dataclass(frozen=True)
class Scheme:
    """One quantization scheme: what gets quantized and how it is checked."""

    name: str
    weight_bits: int
    activations: bool  # True: activations are calibrated and quantized too (static Q/DQ)
    max_ppl_increase: float  # default gate, as a fraction of fp32 perplexity
    quantize_lm_head: bool  # default for the output projection (see docs/calibration.md)
    summary: str
    accuracy_level: int | None = None  # weight-only: default MatMulNBits compute type (below)
    quantize_embedding: bool = False  # default for the token embedding table (below)


# The scheme table. The lm_head stays float in w8a8 because its int8 *activation* (the final
# hidden state) and per-tensor logit error cost the most accuracy for the least speed on a
# GPU; weight-only schemes quantize it because on a CPU decode step it is the largest single
# weight read (V x H) and block-wise weight error there is small.
# Both weight-only schemes default to MatMulNBits accuracy_level 4: the CPU kernel quantizes
# activations to int8 per block of K at run time and uses integer dot products. It is the fast
# path (w4 at level 1, fp32 compute, decodes the 134M benchmark model about 1.8x slower, which
# would put arx w4 well behind onnxruntime-genai's int4, itself built at level 4; w8 at level 1
# is 17x slower than level 4: docs/calibration.md), and on ordinary models it costs nothing
# measurable (arx-tiny: same perplexity at both levels). Its cost is a model with activation
# outliers, where one outlier in a block crushes the block's other values (+224% perplexity on
# the outlier test model in tests/calibration/test_errors_and_gate.py, -0.3% at level 1): the
# table says so, the gate catches it, and its refusal measures and suggests --accuracy-level 1.
# w4 also quantizes the token embedding (int4 GatherBlockQuantized, as llama.cpp's q4 types do
# its token_embd): a decode step reads one row of it, so it costs no speed, but in float32 it
# was most of a w4 bundle's bytes (Llama-3.2-1B: 1.05 GB of 1.59). w8 quantizes a tied table
# (it reads the int8 head's codes) and keeps an untied one float: ORT's quantizer writes
# Gathers at 4 bits only. docs/calibration.md has the measurements.
SCHEMES: dict[str, Scheme] = {
    "w8a8": Scheme("w8a8", 8, True, 0.02, False,
                   "int8 weights (per-channel) and int8 activations (calibrated), explicit "
                   "symmetric Q/DQ for TensorRT and ORT"),
    "w8": Scheme("w8", 8, False, 0.02, True,
                 "int8 block-quantized weights (MatMulNBits on CPU), activations quantized to int8 "
                 "per block at run time (accuracy level 4)", accuracy_level=4,
                 quantize_embedding=True),
    "w4": Scheme("w4", 4, False, 0.10, True,
                 "int4 block-quantized weights (MatMulNBits on CPU), activations quantized to int8 "
                 "per block at run time (accuracy level 4)", accuracy_level=4,
                 quantize_embedding=True),
}

# Activation-range methods and the fewest calibration samples each gives stable ranges with:
# minmax is an extremum over all tokens; entropy and percentile estimate a histogram's tail,
# which a handful of sequences do not populate.
METHODS: dict[str, int] = {"minmax": 4, "entropy": 16, "percentile": 16}

# Block sizes ORT's MatMulNBits quantizer (MLAS MlasQuantizeBlockwise) accepts, for 4 and 8 bits
# alike; anything else fails inside onnxruntime with a C++ assertion.
GROUP_SIZES = (16, 32, 64, 128, 256)

# MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute: the kernel
# quantizes activations to int8 per block of K at run time (fastest on CPU).
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
INT8_ACTIVATIONS = 4

# w8a8 weights in 7 bits instead of 8 (onnxruntime's reduce_range): auto where this host's int8
# MatMul saturates (x86 without VNNI: arx.runtime.int8_kernel), on, off.
REDUCE_RANGE = ("auto", "on", "off")


def scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ArxError(f"unknown scheme {name!r}; known: {', '.join(SCHEMES)}") from None


@dataclass(frozen=True)
class QuantOptions:
    """How the decoder graph is quantized (independent of where the data comes from)."""

    scheme: str = "w8a8"
    method: str = "minmax"  # activation ranges (w8a8 only)
    percentile: float = 99.999  # for method="percentile"
    smoothquant: float | None = None  # SmoothQuant alpha in [0, 1]; None: off (w8a8 only)
    group_size: int = 128  # weight block size along K (w8, w4)
    accuracy_level: int | None = None  # MatMulNBits compute type (w8, w4); None: the scheme's default
    keep_fp: tuple[str, ...] = ()  # MatMul names or prefixes ("layers.3") kept in float
    quantize_lm_head: bool | None = None  # None: the scheme's default
    quantize_embedding: bool | None = None  # None: the scheme's default (w4, w8: quantize)
    reduce_range: str = "auto"  # w8a8: 7-bit weights (REDUCE_RANGE); calibrate resolves auto

    def __post_init__(self):
        s = scheme(self.scheme)
        if self.method not in METHODS:
            raise ArxError(f"unknown calibration method {self.method!r}; known: {', '.join(METHODS)}")
        if not 0.0 < self.percentile <= 100.0:
            raise ArxError(f"--percentile must be in (0, 100] (got {self.percentile})")
        if self.smoothquant is not None:
            if not 0.0 <= self.smoothquant <= 1.0:
                raise ArxError(f"--smoothquant alpha must be in [0, 1] (got {self.smoothquant}); 0.5 is typical")
            if not s.activations:
                raise ArxError(f"--smoothquant moves activation outliers into weights, which only "
                               f"helps w8a8; drop it for the weight-only scheme {s.name}")
        g = self.group_size
        if g not in GROUP_SIZES:
            raise ArxError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))} (got {g}): "
                           f"the block sizes onnxruntime's MatMulNBits supports; 32, 64 or 128 are usual")
        if self.accuracy_level is not None and self.accuracy_level not in ACCURACY_LEVELS:
            raise ArxError(f"--accuracy-level must be one of {ACCURACY_LEVELS} (got {self.accuracy_level})")
        if self.reduce_range not in REDUCE_RANGE:
            raise ArxError(f"--reduce-range must be one of {', '.join(REDUCE_RANGE)} "
                           f"(got {self.reduce_range!r})")
        if self.quantize_embedding and s.activations:
            raise ArxError(f"--embedding quantize is for the weight-only schemes (w4, w8), whose "
                           f"MatMulNBits codes the table shares or matches; drop it for {s.name}")
        if self.reduce_range == "on" and not s.activations:
            raise ArxError(f"--reduce-range keeps w8a8's int8 weights in 7 bits; the weight-only "
                           f"scheme {s.name} does not need it (its kernel does not saturate); drop it")

    @property
    def spec(self) -> Scheme:
        return SCHEMES[self.scheme]

    @property
    def level(self) -> int | None:
        """The MatMulNBits accuracy level used (weight-only schemes; None for w8a8)."""
        return self.spec.accuracy_level if self.accuracy_level is None else self.accuracy_level

    @property
    def int8_activations(self) -> bool:
        """Activations are quantized: calibrated Q/DQ (w8a8) or per block at run time (level 4)."""
        return self.spec.activations or self.level == INT8_ACTIVATIONS

    @property
    def lm_head(self) -> bool:
        return self.spec.quantize_lm_head if self.quantize_lm_head is None else self.quantize_lm_head

    @property
    def embedding(self) -> bool:
        """The token embedding is quantized (embedding_quant.embedding_plan says how), where
        nothing but its Gather and a quantized tied head read it."""
        return self.spec.quantize_embedding if self.quantize_embedding is None else self.quantize_embedding

    @property
    def min_samples(self) -> int:
        """Calibration samples this configuration needs (weight-only needs none)."""
        if self.spec.activations:
            return METHODS[self.method]
        return 0


@dataclass(frozen=True)
class DataOptions:
    """Where calibration and evaluation token sequences come from (a text bundle needs path or
    random; a next-scale bundle draws its own images, path then names their classes)."""

    path: str | None = None  # .txt (one sample per line) or .jsonl
    random: bool = False  # random token ids instead of text (accuracy numbers then mean little)
    text_field: str = "text"  # JSONL field
    chunk: bool = False  # tokenize the whole file and cut it into seq_len chunks
    samples: int = 128  # calibration samples
    seq_len: int = 128  # tokens per sample (at most)
    eval_path: str | None = None  # held-out text; None: a split of `path`
    eval_samples: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.random and self.path:
            raise ArxError("--random and --data contradict each other; pick one")
        if self.samples < 1 or self.eval_samples < 1:
            raise ArxError("--samples and --eval-samples must be >= 1")
        if self.seq_len < 2:
            raise ArxError(f"--seq-len must be >= 2 (got {self.seq_len})")
        if not self.text_field:
            raise ArxError("--text-field must not be empty")


@dataclass(frozen=True)
class CalibrateOptions:
    """Everything `calibrate_bundle` needs besides the paths."""

    quant: QuantOptions = QuantOptions()
    data: DataOptions = DataOptions(random=True)
    max_ppl_increase: float | None = None  # fraction (0.02 = 2 %); None: the scheme's default
    force: bool = False  # write the bundle even when the gate fails
    calibration_cache: str | None = None  # reuse this calibration.json instead of calibrating
    layer_report: int = 5  # worst layers listed in the report
    overwrite: bool = False
    progress: bool = True
    plot: bool = True
    kv_dtype: str = "fp32"  # the output's KV cache: fp32, fp16 or int8 (calibration/kv_quant.py)

    def __post_init__(self):
        from arx.export.kv_dtype import manifest_dtype

        manifest_dtype(self.kv_dtype)  # one line naming the choices
        if self.max_ppl_increase is not None and self.max_ppl_increase < 0:
            raise ArxError(f"--max-ppl-increase must be >= 0 (got {self.max_ppl_increase})")
        if self.calibration_cache and not self.quant.spec.activations:
            raise ArxError(f"--calibration-cache holds activation ranges, which the weight-only "
                           f"scheme {self.quant.scheme} does not use; drop it")

    @property
    def kv_cache(self) -> str:
        """The output cache's manifest dtype."""
        from arx.export.kv_dtype import manifest_dtype

        return manifest_dtype(self.kv_dtype)

    @property
    def gate(self) -> float:
        return self.quant.spec.max_ppl_increase if self.max_ppl_increase is None else self.max_ppl_increase
