"""arx calibrate on a next-scale (VAR) bundle: the images the fp32 bundle draws are the data.

A next-scale decoder reads feature maps (inputs_embeds) that the bundle's own stages build from
the tokens of the coarser scales, so there is no text to calibrate on. The data are images the
fp32 bundle draws itself, by class, with its own sampling settings (the manifest's top-k, top-p,
temperature and CFG scale; image j with seed --seed + j):

    calibration (w8a8)  the fp32 bundle draws --samples images; each scale step's feeds (the
                        block-mask step graph's inputs, cache included) also run ORT's
                        calibrator on the step graph, so the ranges are those of real scale steps
    evaluation          --eval-samples other images (other seeds) drawn by the fp32 bundle; both
                        bundles then step every scale teacher-forced on those tokens, scored as
                        the text gate is, over every position of every scale, on the guided
                        logits the sampler sees (s_k c + (1 - s_k) u, VAR's schedule):
                        perplexity of the drawn tokens, top-1 agreement, KL(fp32 || quantized)
    per-layer error     the last scale's step (the widest) of the first held-out images, the
                        fp32 run's feeds (its cache) given to both graphs
    classes             --data FILE: class ids, one per line; else every class in turn

The quantized decoder's stages (class embedding, next-input, VQ decoder) are the source's
files, unchanged: the two bundles differ only in the decoder's linears.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arx.calibration.data import Samples
from arx.calibration.evaluate import MetricSums, ModelMetrics, RefRows, log_softmax
from arx.errors import ArxError
from arx.manifest import Manifest
from arx.progress import bar

PIPELINE = "next-scale"
IMAGES_PER_RUN = 4  # images drawn together (twice the rows with guidance)
EVAL_SEED_OFFSET = 1_000_003  # held-out images use other seeds than the calibration images
DEFAULT_IMAGES = 32  # arx calibrate's --samples for a next-scale bundle, when not given
DEFAULT_EVAL_IMAGES = 16  # --eval-samples
PROBE_IMAGES = 2  # held-out images whose last scale step the per-layer error compares


def is_next_scale(manifest: Manifest) -> bool:
    return manifest.pipeline.kind == PIPELINE


def check_options(options) -> None:
    """Refuse what does not apply to a next-scale bundle (one line each)."""
    d, q = options.data, options.quant
    refused = [(flag, why) for flag, given, why in (
        ("--random", d.random, "it draws its own images; give class ids with --data or none"),
        ("--chunk", d.chunk, "its data are drawn images, not a text file"),
        ("--eval-data", d.eval_path, "its held-out images are drawn too, with other seeds"),
        ("--smoothquant", q.smoothquant is not None, "SmoothQuant's activation statistics are "
                                                     "collected on text prefills only"),
        (f"--kv-dtype {options.kv_dtype}", options.kv_cache != "float32",
         "its int8/fp16 cache scales are measured on text prefills only"),
    ) if given]
    if refused:
        flag, why = refused[0]
        raise ArxError(f"{flag} does not apply to a next-scale bundle ({why}); drop it")


@dataclass(frozen=True)
class Draw:
    """What a set of images is: their classes and seeds (image j: seeds[j])."""

    classes: tuple[int, ...]
    seeds: tuple[int, ...]

    def runs(self):
        """(classes, first seed) per generate_var call: runs of consecutive seeds."""
        for i in range(0, len(self.classes), IMAGES_PER_RUN):
            yield list(self.classes[i:i + IMAGES_PER_RUN]), self.seeds[i]


def load_image_samples(bundle: Path, manifest: Manifest, opts) -> Samples:
    """Samples whose rows are (class, seed) of each image to draw (calib, then held out)."""
    from arx.runtime.var_generate import var_info

    info = var_info(manifest, bundle)
    classes = _classes(Path(opts.path), info.num_classes) if opts.path else \
        list(range(info.num_classes))
    n_calib, n_eval = opts.samples, opts.eval_samples

    def rows(n: int, first_seed: int) -> list[np.ndarray]:
        return [np.array([classes[j % len(classes)], first_seed + j], np.int64) for j in range(n)]

    source = {"kind": "drawn", "classes": str(opts.path) if opts.path else "every class in turn",
              "images": n_calib, "eval_images": n_eval, "cfg": info.cfg_scale,
              "top_k": info.top_k, "top_p": info.top_p, "temperature": info.temperature,
              "seed": opts.seed, "tokens_per_image": info.tokens}
    return Samples(rows(n_calib, opts.seed), rows(n_eval, opts.seed + EVAL_SEED_OFFSET), source)


def _classes(path: Path, num_classes: int) -> list[int]:
    try:
        words = path.read_text(encoding="utf-8").replace(",", " ").split()
    except (OSError, UnicodeDecodeError) as e:
        raise ArxError(f"cannot read class ids from {path} ({e}); give a text file with one "
                       f"class id per line") from None
    try:
        classes = [int(w) for w in words]
    except ValueError:
        raise ArxError(f"{path} must hold class ids (integers, one per line) for a next-scale "
                       f"bundle; found {next(w for w in words if not w.lstrip('-').isdigit())!r}"
                       ) from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise ArxError(f"{path}: class ids must be in 0..{num_classes - 1} "
                       f"({'none given' if not classes else f'got {bad[0]}'})")
    return classes


def draw_of(rows: list[np.ndarray]) -> Draw:
    return Draw(tuple(int(r[0]) for r in rows), tuple(int(r[1]) for r in rows))


def _var_options(info, seed: int | None):
    from arx.runtime.sampler import SamplingOptions
    from arx.runtime.var_generate import VarOptions

    return VarOptions(info.cfg_scale, SamplingOptions(
        do_sample=True, top_k=info.top_k, top_p=info.top_p, temperature=info.temperature,
        seed=seed))


class _Opened:
    """A bundle's decoder session and its next-scale stages."""

    def __init__(self, bundle: Path):
        from arx.runtime.decoder import DecoderSession
        from arx.runtime.var_generate import VarStages, var_info

        self.session = DecoderSession(bundle)
        manifest = self.session.manifest
        self.info = var_info(manifest, bundle)
        self.stages = VarStages(bundle, manifest, self.info)

    def __enter__(self) -> "_Opened":
        return self

    def __exit__(self, *exc) -> None:
        self.stages.close()
        self.session.__exit__()


def step_feeds(feeds: dict, names: set[str]) -> dict:
    """The step graph's feeds for one observed decoder step. The bundle's fused graph takes
    the first scale (width 1, no past: causal and block masks agree), with attention_mask in
    place of the per-row lengths; every row of a next-scale step has the same length."""
    if "past_lengths" not in feeds:
        width = feeds["inputs_embeds"].shape[1]
        total = feeds["attention_mask"].sum(axis=1).astype(np.int64)
        feeds = {**feeds, "past_lengths": total - width,
                 "new_lengths": np.full_like(total, width), "block_mask": np.ones_like(total)}
    return {k: v for k, v in feeds.items() if k in names}


def calibration_source(bundle: Path, samples: Samples, *, progress: bool):
    """emit-driven feeds for calibration.static.calibrate_ranges: the fp32 bundle draws the
    calibration images and each scale step's feeds are emitted as it runs."""
    from arx.runtime.var_generate import generate_var

    draw = draw_of(samples.calib)

    def run(emit, names: set[str]) -> None:
        with _Opened(bundle) as fp:
            fp.session.observer = lambda feeds: emit(step_feeds(feeds, names))
            runs = list(draw.runs())
            for classes, seed in bar(runs, "calibrating", total=len(runs), enabled=progress):
                generate_var(fp.session, fp.stages, classes, _var_options(fp.info, seed))
    return run


def draw_references(bundle: Path, samples: Samples, *, progress: bool) -> list[list[np.ndarray]]:
    """The held-out images' tokens as the fp32 bundle draws them: per run, per scale (B, n_k)."""
    from arx.runtime.var_generate import generate_var

    out = []
    with _Opened(bundle) as fp:
        runs = list(draw_of(samples.eval).runs())
        for classes, seed in bar(runs, "drawing held-out images", total=len(runs),
                                 enabled=progress):
            r = generate_var(fp.session, fp.stages, classes, _var_options(fp.info, seed))
            out.append([t.reshape(len(classes), -1) for t in r.tokens])
    return out


def forced_log_probs(opened: _Opened, classes: list[int], tokens: list[np.ndarray]
                     ) -> list[np.ndarray]:
    """Per scale the guided log-probs (B, n_k, V) the sampler would see, each scale stepped
    with the given tokens of the scales before it (teacher forcing)."""
    from arx.runtime.var_generate import VarResult, run_scales

    info, out = opened.info, []
    guidance, b, n_scales = _var_options(info, None), len(classes), len(info.patch_nums)

    def choose(k: int, pos: int, logits: np.ndarray) -> np.ndarray:
        if guidance.cfg > 0:  # arx::sample's step 1: u + s (c - u)
            cond, uncond = logits[:b].astype(np.float64), logits[b:]
            logits = uncond + guidance.scale_at(k, n_scales) * (cond - uncond)
        out.append(log_softmax(logits / info.temperature))
        return tokens[k]

    run_scales(opened.session, opened.stages, classes, guidance.cfg > 0, choose,
               VarResult([], [], []))
    return out


def image_metrics(src: Path, candidate: Path, samples: Samples, references, *, progress: bool
                  ) -> ModelMetrics:
    """The gate's metrics of `candidate` against `src` on the drawn held-out images."""
    sums = MetricSums()
    with _Opened(src) as fp, _Opened(candidate) as q:
        runs = list(draw_of(samples.eval).runs())
        for (classes, _), tokens in bar(list(zip(runs, references)), "evaluating",
                                        total=len(runs), enabled=progress):
            for lp_ref, lp_q, target in zip(forced_log_probs(fp, classes, tokens),
                                            forced_log_probs(q, classes, tokens), tokens):
                for i in range(len(classes)):
                    sums.add(RefRows.of(lp_ref[i], target[i]), lp_q[i], target[i])
    return sums.metrics()


def probe_feeds(bundle: Path, samples: Samples, references) -> list[dict]:
    """The last scale step's feeds (copied) of the first PROBE_IMAGES held-out images, run by
    the fp32 bundle teacher-forced on their tokens: the per-layer error's inputs."""
    classes = list(draw_of(samples.eval).classes[:PROBE_IMAGES])
    tokens = [t[:len(classes)] for t in references[0]]
    steps = iter(range(len(tokens)))
    last: dict = {}

    def keep_last_scale(feeds: dict) -> None:
        if next(steps) == len(tokens) - 1:  # copied: the buffers change with the step
            last.update({k: np.array(v) for k, v in feeds.items()})

    with _Opened(bundle) as fp:
        fp.session.observer = keep_last_scale
        forced_log_probs(fp, classes, tokens)
    return [last]


def step_graph_ranges(manifest: Manifest, source, linears, q_opts, workdir: Path):
    """ranges_of for calibration.static.quantize_static_bundle: the reference decoder's
    general-step graph (the graph a scale step runs), calibrated on the steps `source` emits.
    The step graph's MatMuls are the decoder's, by name: only attention is rewritten."""
    def ranges_of(ref_path: Path) -> dict:
        import onnx

        from arx.calibration.static import calibrate_ranges
        from arx.export.step_graph import build_step_graph

        decoder = onnx.load(str(ref_path), load_external_data=False)
        step, _ = build_step_graph(decoder, manifest.decoder, manifest.kv)
        path = Path(workdir) / "reference_step.onnx"
        onnx.save_model(step, str(path))  # weights: references into reference.onnx.data beside it
        return calibrate_ranges(path, source, linears, q_opts)
    return ranges_of


def step_probe_model(model, manifest: Manifest):
    """The general-step graph of a decoder `model` held in memory (weights included): what a
    per-layer Probe of a next-scale bundle runs."""
    from arx.export.step_graph import build_step_graph

    return build_step_graph(model, manifest.decoder, manifest.kv)[0]


def perplexity_increase(samples: Samples, references, metrics: ModelMetrics):
    """A remedies trial scorer: a scratch bundle's perplexity increase on the held-out images."""
    def score(scratch: Path) -> float:
        from arx.export.step_graph import EXTENSION, rebuild_step_graph
        from arx.manifest import read_manifest

        manifest = read_manifest(scratch)  # the candidate decoder: its step graph written anew
        step = manifest.stages[manifest.extensions[EXTENSION]["stage"]]
        manifest.extensions[EXTENSION] = rebuild_step_graph(scratch, manifest.decoder,
                                                            manifest.kv, step.file)
        manifest.write(scratch)
        return image_perplexity(scratch, samples, references) / metrics.ppl_fp32 - 1.0
    return score


def image_perplexity(bundle: Path, samples: Samples, references) -> float:
    """Perplexity of one bundle on the held-out images' tokens, as image_metrics computes
    ppl_quant (a remedy trial runs the candidate only: fp32's is the report's)."""
    nll, n = 0.0, 0
    with _Opened(bundle) as opened:
        for (classes, _), tokens in zip(draw_of(samples.eval).runs(), references):
            for lp, target in zip(forced_log_probs(opened, classes, tokens), tokens):
                nll -= float(np.take_along_axis(lp, target[..., None], -1).sum())
                n += target.size
    return float(np.exp(nll / n))
