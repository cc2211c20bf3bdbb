"""Next-scale generation (VAR): one step per scale, every position of the scale sampled at once.

    cond     var_class([c_0 .. c_B-1, null x B]) ─► (2B, D)       (rows cond then null: CFG)
    scale k  inputs_embeds (2B, n_k, Cvae + D) = [features | cond]   (scale 0: the SOS, features 0)
             session.step(cache, n_k new per row, mask="block", logits="all") ─► (2B, n_k, V)
             per image b: arx::sample over its n_k positions as rows, cond rows then their null
               twins, guidance s_k = 1 + cfg * k / (S - 1) (VAR's (1 + t) c - t u), seed + b,
               offsets = the positions (0 .. L-1 over the whole pyramid) ─► ids (B, n_k)
             var_next_input_k(ids, f_hat) ─► f_hat, features of scale k + 1 (both halves)
    pixels   vq_decoder(f_hat) ─► (B, C, H, W)

The step runs the bundle's general-step graph with the block mask (a scale sees itself and every
coarser one); the KV cache of all earlier scales stays in place. An image drawn with seed s is the
same in any batch (it is drawn alone, by its own rows). cfg 0 runs no null rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from arx.errors import ArxError
from arx.manifest import Manifest
from arx.runtime.backend import BackendOptions, OrtBackend
from arx.runtime.sampler import Sampler, SamplingOptions, resolve_seed

VAR_SECTION = "var"  # the manifest section export/var_protocol.py writes


@dataclass(frozen=True)
class VarOptions:
    cfg: float = 0.0  # VAR's guidance: s_k = 1 + cfg * k / (S - 1) in arx::sample's form; 0: off
    sampling: SamplingOptions = SamplingOptions(do_sample=True)  # seed: image b uses seed + b

    def __post_init__(self):
        if not (self.cfg >= 0 and np.isfinite(self.cfg)):
            raise ArxError(f"--cfg must be >= 0 (got {self.cfg}); 0 turns guidance off")

    def scale_at(self, k: int, n_scales: int) -> float:
        return 1.0 + self.cfg * k / (n_scales - 1)


@dataclass(frozen=True)
class VarInfo:
    """The bundle's `var` section, read once."""

    patch_nums: tuple[int, ...]
    num_classes: int
    null_class: int
    feature_dim: int
    cfg_scale: float
    top_k: int
    top_p: float
    temperature: float
    pixel_range: tuple[float, float]
    class_stage: str
    next_stages: tuple[str, ...]
    vq_stage: str

    @property
    def tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)


@dataclass
class VarResult:
    tokens: list[np.ndarray]  # per scale (B, pn, pn) int64
    classes: list[int]
    seeds: list[int | None]
    step_s: list[float] = field(default_factory=list)  # per scale: step + sampling + next input
    tokens_s: float = 0.0
    pixels: np.ndarray | None = None  # (B, C, H, W) float32
    vq_s: float = 0.0

    @property
    def seconds_per_image(self) -> float:
        return (self.tokens_s + self.vq_s) / len(self.classes) if self.classes else 0.0


def var_info(manifest: Manifest, bundle: str | Path = "the bundle") -> VarInfo:
    s = manifest.extensions.get(VAR_SECTION)
    if manifest.pipeline.kind != "next-scale" or not s:
        raise ArxError(f"{bundle} is a {manifest.pipeline.kind} bundle, not a next-scale one")
    return VarInfo(tuple(s["patch_nums"]), int(s["num_classes"]), int(s["null_class"]),
                   int(s["feature_dim"]), float(s["cfg_scale"]), int(s["top_k"]),
                   float(s["top_p"]), float(s["temperature"]), tuple(s["pixels"]["range"]),
                   s["class_stage"], tuple(s["next_input_stages"]), s["pixels"]["stage"])


class VarStages:
    """The plain stages of a next-scale bundle on ONNX Runtime (opened once, closed together)."""

    def __init__(self, bundle: str | Path, manifest: Manifest, info: VarInfo,
                 options: BackendOptions = BackendOptions()):
        self.manifest, self.info = manifest, info
        self._open: dict[str, OrtBackend] = {}
        try:
            for name in (info.class_stage, *info.next_stages, info.vq_stage):
                path = Path(bundle) / manifest.stages[name].file
                if not path.is_file():
                    raise ArxError(f"bundle {bundle} lacks {path.name}; re-export it")
                self._open[name] = OrtBackend(path, options=options)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "VarStages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for backend in self._open.values():
            backend.close()
        self._open.clear()

    def cond(self, class_ids: np.ndarray) -> np.ndarray:
        """(R,) int64 -> (R, D) float32."""
        return self._open[self.info.class_stage].run({"class_ids": class_ids})["cond"]

    def next_input(self, k: int, ids: np.ndarray, f_hat: np.ndarray):
        """Scale k's ids (B, n_k) into f_hat; -> (f_hat, features (B, n_k+1, Cvae) | None)."""
        out = self._open[self.info.next_stages[k]].run({"tokens": ids, "f_hat": f_hat})
        return out["f_hat_out"], out.get("next_input")

    def pixels(self, f_hat: np.ndarray) -> np.ndarray:
        return self._open[self.info.vq_stage].run({"f_hat": f_hat})["pixels"]


class VarEngineSession:
    """A next-scale TensorRT engine (runtime/engine_session.py) behind generate_var's session
    API. The form (builder/tensorrt_form.py) bakes the block mask into every row and returns
    every position's logits, so a step asking for anything else is refused rather than run."""

    def __init__(self, engine):
        self.engine = engine

    def new_cache(self, rows: int, max_len: int | None = None):
        if rows > self.engine.max_batch:
            raise ArxError(f"{rows} cache rows (the images, twice with guidance) exceed the "
                           f"engine's max batch of {self.engine.max_batch}; generate fewer "
                           f"images or rebuild with a larger arx build --max-batch")
        if (max_len or 0) > self.engine.s_max:
            raise ArxError(f"the scale schedule's {max_len} tokens exceed the engine's static "
                           f"cache of {self.engine.s_max}; rebuild with arx build "
                           f"--max-seq-len {max_len}")
        return self.engine.new_cache(rows)

    def step(self, cache, ids, new_lens, logits: str = "all", mask: str = "block",
             inputs_embeds: np.ndarray | None = None) -> np.ndarray:
        if mask != "block" or logits != "all":
            raise ArxError("a next-scale engine steps whole scales (block mask, every "
                           "position's logits)")
        return self.engine.step(cache, ids, new_lens, "all", inputs_embeds=inputs_embeds)


def generate_var(session, stages: VarStages, classes: list[int], options: VarOptions) -> VarResult:
    """Token maps of every scale and f_hat's pixels for `classes`; see the module docstring."""
    info = stages.info
    check_classes(info, classes)
    b, n_scales = len(classes), len(info.patch_nums)
    base = resolve_seed(options.sampling.seed) if options.sampling.do_sample else None
    seeds = [None if base is None else base + i for i in range(b)]

    def choose(k: int, pos: int, logits: np.ndarray) -> np.ndarray:
        sampling = replace(options.sampling, cfg_scale=options.scale_at(k, n_scales)) \
            if options.cfg > 0 else options.sampling
        return choose_block(logits, pos, b, seeds, sampling)

    result = VarResult([], list(classes), seeds)
    f_hat = run_scales(session, stages, classes, options.cfg > 0, choose, result)
    t = time.perf_counter()
    result.pixels = stages.pixels(f_hat)
    result.vq_s = time.perf_counter() - t
    return result


def check_classes(info: VarInfo, classes: list[int]) -> None:
    bad = [c for c in classes if not 0 <= c < info.num_classes]
    if not classes or bad:
        raise ArxError(f"give classes in 0..{info.num_classes - 1} (got {classes})")


def run_scales(session, stages: VarStages, classes: list[int], guided: bool, choose,
               result: VarResult) -> np.ndarray:
    """The scale loop: choose(k, pos, logits (R, n_k, V)) -> ids (B, n_k) picks scale k's
    tokens (R = 2B with guidance: cond rows, then null); they go into result.tokens (with the
    times) and through var_next_input_k. Returns the final f_hat (B, Cvae, hw, hw)."""
    info = stages.info
    b = len(classes)
    ids = np.array(list(classes) + [info.null_class] * (b if guided else 0), np.int64)
    rows = len(ids)
    cond = stages.cond(ids)  # (rows, D)
    hw = info.patch_nums[-1]
    f_hat = np.zeros((b, info.feature_dim, hw, hw), np.float32)
    feats = np.zeros((rows, 1, info.feature_dim), np.float32)
    cache = session.new_cache(rows, info.tokens)
    try:
        t0, pos = time.perf_counter(), 0
        for k, pn in enumerate(info.patch_nums):
            t, n = time.perf_counter(), pn * pn
            embeds = np.concatenate([feats, np.repeat(cond[:, None], n, axis=1)], axis=-1)
            logits = session.step(cache, None, np.full(rows, n, np.int64), logits="all",
                                  mask="block", inputs_embeds=embeds)  # (rows, n, V)
            chosen = choose(k, pos, logits)
            f_hat, nxt = stages.next_input(k, chosen, f_hat)
            if nxt is not None:
                feats = np.tile(nxt, (rows // b, 1, 1))  # the same features to both halves
            result.tokens.append(chosen.reshape(b, pn, pn))
            result.step_s.append(time.perf_counter() - t)
            pos += n
        result.tokens_s = time.perf_counter() - t0
    finally:
        cache.close()
    return f_hat


def choose_block(logits: np.ndarray, pos: int, b: int, seeds, sampling: SamplingOptions):
    """(B, n) ids of one scale from logits (R, n, V), R = B or 2B (cond rows, then null).

    Image i is drawn alone: arx::sample over its n positions as rows (with guidance its n cond
    rows, then their n null twins), seed seeds[i], offsets pos .. pos + n - 1: the positions,
    so a position's draw does not depend on the batch or on how the scale was stepped."""
    n = logits.shape[1]
    offsets = np.arange(pos, pos + n, dtype=np.int64)
    out = np.empty((b, n), np.int64)
    for i in range(b):
        rows = logits[i] if logits.shape[0] == b else np.concatenate([logits[i], logits[b + i]])
        out[i] = Sampler(replace(sampling, seed=seeds[i]), logits.shape[-1])(rows, None, offsets)
    return out
