#!/usr/bin/env python3
"""Check a built engine against ONNX Runtime on the same steps (Polygraphy runner + comparator).

Serves twice, like trt_build.py: `arx build` imports it (arx.builder.trt_check) right after it
builds an engine, and every build kit carries a verbatim copy as check_engine.py, which the
kit's build_engine.py runs after the build. So it imports nothing from arx: stdlib, numpy,
polygraphy (and TensorRT through Polygraphy's TrtRunner).

    python check_engine.py --engine decoder.engine --inputs check_inputs.npz \
        --reference check_reference.npz --precision fp16 --tolerance 0.01 [--plugins plugins]

The steps are a ragged prefill and a few decode steps; the reference is the bundle's own
decoder run on ONNX Runtime over the same steps (live inside arx build, saved in Polygraphy's
.npz files in a kit, where neither the bundle nor onnxruntime need be present).

Why each runner carries its own cache: the cache is state (present -> past), and Polygraphy's
comparator compares iterations independently. Feeding both runners the reference's previous
cache would need the whole (B, H, S_max, D) cache of every layer in every saved iteration (GBs
for a real model in a kit) and would hide what generation does: an engine's own cache error
feeding its next step. Here the feeds carry only the step (ids, lengths, sampler inputs), each
runner feeds its own presents back (CacheCarrier), and the comparator sees last_logits at every
step and each layer's cache (the rows' valid positions) at the last step, which holds every
position the steps wrote: a wrong layer is named, not just wrong logits.
"""

import argparse
import json
import os
import sys

import numpy as np

# Polygraphy is imported where it is used: arx writes a kit's check data (valid_cache, the
# .npz steps) on machines without it.
LOGITS, TOKEN_IDS = "last_logits", "token_ids"
REFERENCE, ENGINE = "onnxruntime", "tensorrt"  # runner names in the RunResults


def load_steps(path):
    """A list of per-step dicts {name: array} from an .npz whose keys are "<step>/<name>"
    (the format arx.builder.check.save_steps writes: numpy only, binary, compact)."""
    with np.load(path) as data:
        steps = {}
        for key in data.files:
            step, name = key.split("/", 1)
            steps.setdefault(int(step), {})[name] = data[key]
    return [steps[i] for i in sorted(steps)]


def valid_cache(cache, lengths):
    """{name: (B, H, T, D) float32}: the first T = max(lengths) positions of each cache
    buffer, each row zeroed past its own length (slots beyond are unwritten or stale)."""
    lengths = np.asarray(lengths, np.int64)
    width = int(lengths.max())
    keep = np.arange(width)[None, :] < lengths[:, None]  # (B, T)
    return {name: np.where(keep[:, None, :, None], np.asarray(buf)[:, :, :width], 0).astype(np.float32)
            for name, buf in cache.items()}


def cache_carrier(runner, aliases, name=ENGINE):
    """A Polygraphy runner wrapping `runner` (TrtRunner, OnnxrtRunner, ...) whose KV cache is
    state: each step's present.i.* becomes the next step's past_key_values.i.* (`aliases`:
    present -> past); a step whose past_lengths are all 0 starts a zeroed cache. It returns
    the step's other outputs and, under the present names, the cache's valid positions."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.datatype import DataType

    class CacheCarrier(BaseRunner):
        def activate_impl(self):
            runner.activate()
            meta = runner.get_input_metadata(use_numpy_dtypes=False)
            pasts = set(aliases.values())
            self.cache_meta = {n: (DataType.to_dtype(m.dtype, "numpy"), m.shape)
                               for n, m in meta.items() if n in pasts}
            self.step_meta, self.cache = TensorMetadata(), {}
            for n, m in meta.items():
                if n not in pasts:
                    self.step_meta.add(n, m.dtype, m.shape)

        def get_input_metadata_impl(self):
            return self.step_meta

        def infer_impl(self, feed_dict):
            if not self.cache or not np.any(feed_dict["past_lengths"]):
                batch = feed_dict["past_lengths"].shape[0]  # input_ids or inputs_embeds
                self.cache = {n: np.zeros((batch, *shape[1:]), dtype)
                              for n, (dtype, shape) in self.cache_meta.items()}
            out = runner.infer({**feed_dict, **self.cache})
            self.inference_time = runner.last_inference_time()
            for present, past in aliases.items():
                self.cache[past] = np.array(out[present])  # a copy: runners reuse buffers
            result = {k: np.array(v) for k, v in out.items() if k not in aliases}
            lengths = feed_dict["past_lengths"] + feed_dict["new_lengths"]
            result.update(valid_cache({p: self.cache[q] for p, q in aliases.items()}, lengths))
            return result

        def deactivate_impl(self):
            runner.deactivate()
            self.cache = {}

    return CacheCarrier(name=name)


def _atols(reference, tolerance):
    """Per output: tolerance x the largest |value| the reference gives it over all steps, so
    one relative number serves logits (tens) and cache entries (units) of any model."""
    scale = {}
    for iteration in reference:
        for name, value in iteration.items():
            scale[name] = max(scale.get(name, 0.0), float(np.abs(value).max()))
    return {name: tolerance * s for name, s in scale.items()}


def _token_mismatches(reference, engine, atol, codebook=None):
    """Steps x rows whose engine token is not the reference's argmax by more than `atol` of
    the reference logits (a near tie may flip in low precision and is no error). An image
    engine draws one id per [cond; null] pair (the check's guidance scale is 1: the cond row),
    over the codebook's columns when `codebook` = [offset, size] says where they lie."""
    wrong, ties, total = 0, 0, 0
    for ref, eng in zip(reference, engine):
        if TOKEN_IDS not in eng:
            continue
        ids = np.asarray(eng[TOKEN_IDS]).reshape(-1).astype(np.int64)
        logits = ref[LOGITS][:len(ids)]
        if codebook:
            logits = logits[:, codebook[0]:codebook[0] + codebook[1]]
        gap = logits.max(axis=-1) - logits[np.arange(len(ids)), ids]
        wrong += int((gap > atol).sum())
        ties += int(((gap > 0) & (gap <= atol)).sum())
        total += len(ids)
    return {"mismatches": wrong, "near_ties": ties, "tokens": total} if total else None


def compare(results, precision, tolerance, codebook=None):
    """The check's report from RunResults holding the reference, then the engine: per output
    the worst max/mean absolute error over the steps and its allowed error; passed; worst."""
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    reference, engine = results[REFERENCE], results[ENGINE]
    atol = _atols(reference, tolerance)
    func = SimpleCompareFunc(check_error_stat="max", atol={"": 0.0, **atol}, rtol=0.0)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # the caller prints one line, not Polygraphy's log
        accuracy = Comparator.compare_accuracy(results, compare_func=func)[0]
    outputs = {}
    for step, per_output in enumerate(next(iter(accuracy.values()))):
        for name, r in per_output.items():
            worst = outputs.get(name)
            if worst is None or r.max_absdiff > worst["max_abs"]:
                outputs[name] = {"max_abs": r.max_absdiff, "mean_abs": r.mean_absdiff,
                                 "atol": atol[name], "step": step, "passed": bool(r)}
    report = {"precision": precision, "tolerance": tolerance, "steps": len(reference),
              "reference": REFERENCE, "outputs": outputs}
    tokens = _token_mismatches(reference, engine, atol.get(LOGITS, 0.0), codebook)
    if tokens:
        report[TOKEN_IDS] = tokens
    return _verdict(report)


def _verdict(report):
    def excess(name, o):
        return o["max_abs"] / o["atol"] if o["atol"] else float("inf") * (o["max_abs"] > 0)

    ranked = sorted(report["outputs"].items(), key=lambda item: -excess(*item))
    failed = [name for name, o in ranked if not o["passed"]]
    tokens = report.get(TOKEN_IDS)
    if tokens and tokens["mismatches"]:
        failed.append(TOKEN_IDS)
    report["passed"] = not failed
    report["worst"] = failed[0] if failed else (ranked[0][0] if ranked else None)
    if failed and failed[0] == TOKEN_IDS:
        report["message"] = (f"token_ids: {tokens['mismatches']} of {tokens['tokens']} tokens are "
                             f"not the reference's argmax (beyond near ties)")
    elif failed:
        o = report["outputs"][failed[0]]
        report["message"] = (f"{failed[0]} differs from ONNX Runtime by {o['max_abs']:.3g} at step "
                             f"{o['step']} (allowed {o['atol']:.3g}: {report['tolerance']:g} of its "
                             f"largest value, the {report['precision']} tolerance)"
                             + (f"; {len(failed) - 1} more outputs over" if len(failed) > 1 else ""))
    return report


def run_check(engine_runner, feeds, reference, precision, tolerance, codebook=None):
    """Run `engine_runner` (a cache_carrier named ENGINE) over `feeds` (a list of step feed
    dicts) and compare it with `reference`, a list of per-step output dicts of ONNX Runtime."""
    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        engine = Comparator.run([engine_runner], data_loader=feeds)
    results = RunResults()
    results.add(reference, runner_name=REFERENCE)
    results.append((ENGINE, engine[ENGINE]))
    return compare(results, precision, tolerance, codebook)


def parser():
    ap = argparse.ArgumentParser(description="Check a TensorRT engine against ONNX Runtime's "
                                             "outputs on the same steps (Polygraphy).")
    ap.add_argument("--engine", required=True, help="the engine file")
    ap.add_argument("--inputs", required=True, help="the steps' feeds (.npz, \"<step>/<name>\")")
    ap.add_argument("--reference", required=True, help="ONNX Runtime's outputs per step (.npz)")
    ap.add_argument("--kit-json", default="kit.json",
                    help="the kit's kit.json: kv.aliases maps present -> past cache names")
    ap.add_argument("--precision", required=True, help="the engine's precision (for the message)")
    ap.add_argument("--tolerance", required=True, type=float,
                    help="allowed max error per output, relative to its largest reference value")
    ap.add_argument("--plugins", help="folder of the kit's plugin PTX (registers kit_plugins)")
    ap.add_argument("--report", help="build report JSON to add the result to (as 'check')")
    ap.add_argument("--force", action="store_true", help="keep an engine over the tolerance")
    return ap


def main(argv=None):
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    args = parser().parse_args(argv)
    if args.plugins:  # the engine's plugin layers need their creators before deserialising
        sys.path.insert(0, os.path.dirname(os.path.abspath(args.plugins)))
        import kit_plugins

        kit_plugins.register(args.plugins)
    with open(args.kit_json, encoding="utf-8") as f:
        kit = json.load(f)
    runner = cache_carrier(TrtRunner(EngineFromBytes(BytesFromPath(args.engine))),
                           kit["kv"]["aliases"])
    report = run_check(runner, load_steps(args.inputs), load_steps(args.reference),
                       args.precision, args.tolerance, kit.get("codebook"))
    report["forced"] = bool(args.force and not report["passed"])
    if args.report:
        with open(args.report, encoding="utf-8") as f:
            build = json.load(f)
        build["check"] = report
        with open(args.report + ".tmp", "w", encoding="utf-8") as f:
            json.dump(build, f, indent=2)
        os.replace(args.report + ".tmp", args.report)
    if report["passed"] or args.force:
        print(f"engine check {'passed' if report['passed'] else 'FAILED, kept (--force)'}: worst "
              f"output {report['worst']}")
        return 0
    os.replace(args.engine, args.engine + ".rejected")  # not usable under its name; kept
    print(f"engine check failed: {report['message']}; the engine is kept as "
          f"{os.path.basename(args.engine)}.rejected; rerun with --force to keep it as is",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
