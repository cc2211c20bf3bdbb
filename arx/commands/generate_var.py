"""arx generate BUNDLE --class N --image out.png [--cfg S] [--batch K] on a next-scale (VAR) bundle.

The image flags are those of image-token bundles (arx/commands/generate_image.py); what a
next-scale bundle cannot take (a prompt, text or speculation flags, --cfg-schedule: VAR's
schedule is part of the model) is refused in one line before anything runs, and the PNG is
written atomically after the loop.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from contextlib import contextmanager

from arx.errors import ArxError


def run_var(args, manifest, generate_options, speculation=None) -> int:
    from arx.commands.generate_image import _paths, _refuse_text_flags, _write, check_output_flags
    from arx.runtime.image_output import check_image_path
    from arx.runtime.var_generate import VarOptions, var_info

    info = var_info(manifest, args.bundle)
    _refuse_text_flags(args, allowed=("engine",))
    refused = [flag for flag, given in (("--speculate", args.speculate), ("--draft/--lookup",
               speculation), ("--cfg-schedule", args.cfg_schedule), ("a prompt", args.prompt),
               ("--prompt-ids", args.prompt_ids)) if given is not None]
    if refused:
        raise ArxError(f"{refused[0]} does not apply to a next-scale bundle (class-conditional, "
                       f"VAR's guidance schedule); give --class N and the image flags only")
    if args.class_ is None:
        raise ArxError(f"{args.bundle} is class-conditional: give --class N "
                       f"(0..{info.num_classes - 1})")
    check_output_flags(args)
    classes = [c for c in args.class_ for _ in range(args.batch or 1)]
    bad = [c for c in classes if not 0 <= c < info.num_classes]
    if bad:
        raise ArxError(f"--class {bad[0]} is outside the bundle's {info.num_classes} classes "
                       f"(0..{info.num_classes - 1})")
    paths = _paths(args.image, len(classes))
    for path in paths:
        check_image_path(path)
    defaults = dataclasses.replace(manifest.generation, do_sample=True, top_k=info.top_k,
                                   top_p=info.top_p, temperature=info.temperature)
    options = VarOptions(cfg=info.cfg_scale if args.cfg is None else args.cfg,
                         sampling=generate_options(args, defaults).sampling)
    result = _generate(args, manifest, info, classes, options)
    if paths:
        _write(paths, result, info, args.zoom)
    if args.json:
        print(json.dumps(_as_json(result, info, paths)))
    print(f"[{len(classes)} images, {len(info.patch_nums)} scales of {info.tokens} tokens"
          f"{' -> ' + ', '.join(paths) if paths else ''}, steps "
          f"{', '.join(f'{s * 1e3:.0f}' for s in result.step_s)} ms, "
          f"{result.seconds_per_image:.3f} s per image]", file=sys.stderr)
    return 0


def _generate(args, manifest, info, classes, options):
    from arx.runtime.backend import BackendOptions
    from arx.runtime.var_generate import VarStages, generate_var

    backend = BackendOptions(device=args.device, intra_op_threads=args.threads,
                             spin_wait=not args.no_spin)
    with _session(args, manifest, backend) as session, \
            VarStages(args.bundle, manifest, info, backend) as stages:
        return generate_var(session, stages, classes, options)


@contextmanager
def _session(args, manifest, backend):
    """The decoder on ONNX Runtime, or with --engine the engine `arx build` made for the
    bundle (its transformer; var_class, the next-input stages and the VQ decoder stay on ORT)."""
    if not args.engine:
        from arx.runtime.decoder import DecoderSession

        with DecoderSession(args.bundle, backend, manifest) as session:
            yield session
        return
    from arx.runtime.engine_session import open_engine
    from arx.runtime.var_generate import VarEngineSession

    with open_engine(args.bundle, args.engine) as engine:
        yield VarEngineSession(engine)


def _as_json(result, info, paths) -> dict:
    return {"images": [{"class": c, "seed": s, "tokens": [t[i].tolist() for t in result.tokens]}
                       for i, (c, s) in enumerate(zip(result.classes, result.seeds))],
            "patch_nums": list(info.patch_nums), "files": paths,
            "scale_step_s": result.step_s, "tokens_s": result.tokens_s,
            "vq_decoder_s": result.vq_s, "seconds_per_image": result.seconds_per_image}
