"""Image-token generation: a loop policy over the session step API, with classifier-free guidance.

    rows [0, B) cond, [B, 2B) null class                      (the doubled batch of LlamaGen)
    prefill  session.step(cache, [V + c_0 .. V + c_B-1, V + null x B], 1) ─► logits (2B, V)
    token k  per image b: Sampler(seed + b, cfg_scale(k)) on rows (b, B + b) ─► id (one draw,
             Philox offset = its position 1 + k, as row 0: an image's tokens do not depend on
             what else is in the batch)
    feed     [ids; ids] to both halves, k + 1 < N; after N tokens the vq_decoder stage turns the
             (B, N) grid into pixels (B, C, H, W)

Guidance is the one sampling definition's (arx::sample, plugins/sampling/reference.py):
uncond + s * (cond - uncond) on the raw logits, then temperature, top-k, top-p. A scale of 1
with no schedule is the conditional model alone, so the null rows are not run at all. The
`linear` schedule raises the scale over the token index, 1 at the first token to `cfg_scale`
at the last (MAR/RAR-style; VAR guides per scale likewise). Sessions are anything with the step
API of runtime/decoder.py (`new_cache`, `step(..., logits="last")`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from arx.errors import ArxError
from arx.manifest import Manifest
from arx.runtime.sampler import Sampler, SamplingOptions, resolve_seed

IMAGE_SECTION = "image"  # the manifest section export/image_protocol.py writes
SCHEDULES = ("constant", "linear")


@dataclass(frozen=True)
class ImageOptions:
    cfg_scale: float = 4.0  # 1: no guidance (the null rows are skipped); 0: unconditional
    cfg_schedule: str = "constant"  # "linear": 1 at the first token -> cfg_scale at the last
    sampling: SamplingOptions = SamplingOptions(do_sample=True)  # seed: image b uses seed + b

    def __post_init__(self):
        if not (self.cfg_scale >= 0 and np.isfinite(self.cfg_scale)):
            raise ArxError(f"--cfg must be >= 0 (got {self.cfg_scale}); 1 turns guidance off")
        if self.cfg_schedule not in SCHEDULES:
            raise ArxError(f"--cfg-schedule must be one of {', '.join(SCHEDULES)} "
                           f"(got {self.cfg_schedule!r})")

    @property
    def guided(self) -> bool:
        return not (self.cfg_scale == 1.0 and self.cfg_schedule == "constant")

    def scale_at(self, k: int, n: int) -> float:
        """The guidance scale of token k of n."""
        if self.cfg_schedule == "linear":
            return 1.0 + (self.cfg_scale - 1.0) * (k / (n - 1) if n > 1 else 1.0)
        return self.cfg_scale


@dataclass(frozen=True)
class ImageInfo:
    """The bundle's `image` section, read once."""

    grid: tuple[int, int]
    num_classes: int
    null_class: int
    class_offset: int
    cfg_scale: float
    pixel_range: tuple[float, float]
    vq_stage: str
    top_k: int = 0  # the model's default sampling over the codebook
    temperature: float = 1.0
    condition: dict = field(default_factory=dict)  # the section's condition ("kind": class|text)
    codebook_offset: int = 0  # image token k is logit column / input id offset + k
    codebook_size: int = 0  # 0: every logit column is an image token

    @property
    def text(self) -> bool:
        """Conditioned on a text prompt (Janus), not a class."""
        return self.condition.get("kind") == "text"

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class ImageResult:
    tokens: np.ndarray  # (B, gh, gw) int64 codebook ids
    classes: list[int]
    seeds: list[int | None]  # per image (None: greedy)
    first_token_s: float = 0.0  # time to the first image token (prefill + its sampling)
    step_s: list[float] = field(default_factory=list)  # each decode step, whole batch
    tokens_s: float = 0.0  # the whole token loop
    pixels: np.ndarray | None = None  # (B, C, H, W) float32, from the vq_decoder stage
    vq_s: float = 0.0

    @property
    def image_tokens_per_s(self) -> float:
        return self.tokens.size / self.tokens_s if self.tokens_s else 0.0

    @property
    def seconds_per_image(self) -> float:
        return (self.tokens_s + self.vq_s) / len(self.classes) if self.classes else 0.0


def image_info(manifest: Manifest, bundle: str | Path = "the bundle") -> ImageInfo:
    """The image section of an image-token bundle; one line for any other bundle."""
    section = manifest.extensions.get(IMAGE_SECTION)
    if manifest.pipeline.kind != "image-tokens" or not section:
        raise ArxError(f"{bundle} is a {manifest.pipeline.kind} bundle, not an image-token "
                       f"one; --image, --class and --cfg need an image-token bundle "
                       f"(arx export of a model with arx_image, README 'Image-token generation')")
    cond, pixels = section["condition"], section["pixels"]
    return ImageInfo(tuple(section["grid"]), int(cond.get("num_classes", 0)),
                     int(cond.get("null_class", -1)), int(cond.get("class_token_offset", 0)),
                     float(section.get("cfg_scale", 1.0)), tuple(pixels["range"]),
                     pixels["stage"], int(section.get("top_k", 0)),
                     float(section.get("temperature", 1.0)), dict(cond),
                     int(section.get("codebook", {}).get("offset", 0)),
                     int(section.get("codebook", {}).get("size", 0)))


def check_classes(info: ImageInfo, classes: list[int]) -> None:
    if not classes:
        raise ArxError("give at least one class: --class N")
    bad = [c for c in classes if not 0 <= c < info.num_classes]
    if bad:
        raise ArxError(f"--class {bad[0]} is outside the bundle's {info.num_classes} classes "
                       f"(0..{info.num_classes - 1})")


def generate_images(session, classes: list[int], options: ImageOptions) -> ImageResult:
    """Codebook grids for `classes` (one image each) with CFG; see the module docstring."""
    info = image_info(session.manifest)
    check_classes(info, classes)
    b = len(classes)
    ids = np.array(classes + [info.null_class] * (b if options.guided else 0), np.int64)
    prefix = Prefix(np.ones(len(ids), np.int64), ids=(ids + info.class_offset)[:, None])
    return grid_loop(session, info, prefix, list(classes), options)


@dataclass(frozen=True)
class Prefix:
    """The condition's prefill, rows [cond; null] (the null rows only when guided): right-padded
    ids (R, L) or embeddings (R, L, H) (Janus' text prompts, runtime/janus_generate.py)."""

    lengths: np.ndarray  # (R,) int64 tokens per row
    ids: np.ndarray | None = None
    embeds: np.ndarray | None = None


def grid_loop(session, info: ImageInfo, prefix: Prefix, conditions: list,
              options: ImageOptions) -> ImageResult:
    """The token loop after any condition prefix; `conditions` one per image (a class, a
    prompt). Token k of image b is drawn at offset lengths[b] + k, its position."""
    b, n = len(conditions), info.tokens
    base = resolve_seed(options.sampling.seed) if options.sampling.do_sample else None
    seeds = [None if base is None else base + i for i in range(b)]
    rows, need = len(prefix.lengths), int(prefix.lengths.max()) + n - 1  # all but the last token
    if need > session.manifest.kv.max_seq_len:  # checked here: past the RoPE table ORT fails
        raise ArxError(f"a prefix of {int(prefix.lengths.max())} tokens and {n} image tokens need "
                       f"{need} positions, more than the bundle's context of "
                       f"{session.manifest.kv.max_seq_len}; shorten the prompt or re-export with a "
                       f"larger --max-seq-len")
    cache = session.new_cache(rows, need)
    out = np.zeros((b, n), np.int64)
    result = ImageResult(out.reshape(b, *info.grid), list(conditions), seeds)
    device = getattr(session, "draws", False)  # an engine's arx::sample (runtime/image_engine.py)

    def token(k, ids, lens, embeds=None):  # (b,) ids of token k after this step
        if device:
            return session.draw(cache, ids, lens, options.scale_at(k, n), inputs_embeds=embeds)
        logits = session.step(cache, ids, lens, logits="last", inputs_embeds=embeds)[:, 0]
        return _choose(_codebook(logits, info), k, n, seeds, options, b, prefix.lengths[:b] + k)
    try:
        if device:
            session.start(cache, options.sampling, seeds)
        t0 = time.perf_counter()
        out[:, 0] = token(0, prefix.ids, prefix.lengths, prefix.embeds)
        result.first_token_s = time.perf_counter() - t0
        for k in range(1, n):
            t = time.perf_counter()
            # the same token to both halves, as the id the model reads it by
            feed = np.tile(out[:, k - 1] + info.codebook_offset, rows // b)[:, None]
            out[:, k] = token(k, feed, np.ones(rows, np.int64))
            result.step_s.append(time.perf_counter() - t)
        result.tokens_s = time.perf_counter() - t0
    finally:
        cache.close()
    return result


def _codebook(logits: np.ndarray, info: ImageInfo) -> np.ndarray:
    """(R, V) -> (R, codebook) the image tokens' columns (a view), where the vocabulary is shared
    with text: text ids can never be drawn, and the filters and Philox draw see the codebook
    alone, so the device's arx::sample over the same slice gives the same ids."""
    if info.codebook_size and info.codebook_size != logits.shape[-1]:
        return logits[:, info.codebook_offset:info.codebook_offset + info.codebook_size]
    return logits


def _choose(logits: np.ndarray, k: int, n: int, seeds, options: ImageOptions, b: int,
            positions: np.ndarray | None = None):
    """(B,) ids of token k: each image drawn alone, as row 0 with its own seed, at offset
    positions[i] (its position; default 1 + k, after one class token), from its cond row (and
    its uncond twin, mixed by arx::sample)."""
    sampling = replace(options.sampling, cfg_scale=options.scale_at(k, n))
    ids = np.empty(b, np.int64)
    positions = np.full(b, 1 + k, np.int64) if positions is None else positions
    for i in range(b):
        rows = logits[[i, b + i]] if options.guided else logits[[i]]
        ids[i] = Sampler(replace(sampling, seed=seeds[i]), logits.shape[-1])(
            rows, None, positions[i:i + 1])[0]
    return ids


def decode_pixels(bundle: str | Path, info: ImageInfo, manifest: Manifest, tokens: np.ndarray,
                  backend_options=None) -> np.ndarray:
    """(B, gh, gw) ids -> (B, C, H, W) float32 through the vq_decoder stage."""
    from arx.runtime.backend import BackendOptions, OrtBackend

    stage = manifest.stages[info.vq_stage]
    path = Path(bundle) / stage.file
    if not path.is_file():
        raise ArxError(f"bundle {bundle} lacks {stage.file}; re-export it")
    with OrtBackend(path, options=backend_options or BackendOptions()) as vq:
        flat = np.ascontiguousarray(tokens.reshape(tokens.shape[0], -1), np.int64)
        return vq.run({stage.inputs[0].name: flat})[stage.outputs[0].name]
