"""TensorRT optimization profiles, derived from the TensorRT form's IO (itself from the manifest).

Two profiles, one engine (the weights are shared):

    profile   batch            new tokens S
    prefill   1 .. opt .. max  1 .. prompt .. S_max
    decode    1 .. opt .. max  1 .. 1 .. decode_tokens

The symbolic dims are found by role in the stage (batch = input_ids dim 0, S = input_ids dim 1),
never by spelling; every other dim of the form is static (the cache is (B, kv_heads, S_max, D))
and the per-row lengths are (B,), so a decode step's shapes never change (CUDA-graph replay).
"""

from __future__ import annotations

from dataclasses import dataclass

from arx.errors import ArxError
from arx.manifest import Stage

from .image_form import IMAGE_ROWS
from .options import BuildOptions

Range = tuple[int, int, int]  # (min, opt, max)


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> min/opt/max

    def to_json(self) -> dict:
        return {"name": self.name,
                "shapes": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])}
                           for k, v in self.shapes.items()}}


def _roles(stage: Stage) -> dict[str, str]:
    """symbol -> role ("batch", "new", "total") from where the symbols sit in the stage."""
    ids = stage.input("input_ids") or stage.input("inputs_embeds")  # (B, S[, hidden])
    if ids is None:
        raise ArxError("the decoder has no input_ids input; re-export the bundle")
    roles = {}
    for dim, role in ((ids.shape[0], "batch"), (ids.shape[1], "new")):
        if isinstance(dim, str):
            roles[dim] = role
    roles[IMAGE_ROWS] = "images"  # a guided image sampler's rows (builder/image_form.py)
    return roles


def with_images(ranges: dict[str, Range]) -> dict[str, Range]:
    """An image engine's sampler has one row per [cond; null] pair of cache rows."""
    return {**ranges, "images": tuple(max(1, n // 2) for n in ranges["batch"])}


def block_widths(manifest) -> tuple[int, ...]:
    """A next-scale bundle's step widths (each scale's pn^2, its schedule); () for others."""
    if manifest.pipeline.kind != "next-scale":
        return ()
    return tuple(p * p for p in manifest.extensions["var"]["patch_nums"])


def dim_ranges(options: BuildOptions, s_max: int,
               widths: tuple[int, ...] = ()) -> dict[str, dict[str, Range]]:
    """profile name -> role -> (min, opt, max). widths (a next-scale schedule): one profile of
    exactly that width per scale instead (the SOS step of width 1 is "decode"), so TensorRT
    tunes each scale's shapes; every step of such a model is one whole scale."""
    max_b = options.batch()
    opt_b = min(options.opt_batch or max(1, max_b // 2), max_b)
    if widths:
        return {("decode" if w == 1 else f"scale_{w}"): {"batch": (1, opt_b, max_b),
                                                        "new": (w, w, w)} for w in widths}
    prompt = min(options.opt_prompt_len or max(1, s_max // 4), s_max)
    decode = min(options.decode_tokens, s_max)
    return {
        "prefill": {"batch": (1, opt_b, max_b), "new": (1, prompt, s_max)},
        "decode": {"batch": (1, opt_b, max_b), "new": (1, 1, decode)},
    }


def make_profiles(stage: Stage, options: BuildOptions, s_max: int,
                  widths: tuple[int, ...] = ()) -> list[Profile]:
    roles = _roles(stage)
    profiles = []
    for name, ranges in dim_ranges(options, s_max, widths).items():
        ranges = with_images(ranges)
        shapes = {}
        for t in stage.inputs:
            per_bound = []
            for bound in range(3):
                dims = []
                for d in t.shape:
                    if isinstance(d, int):
                        dims.append(d)
                    elif d in roles:
                        dims.append(ranges[roles[d]][bound])
                    else:
                        raise ArxError(f"input {t.name} has a symbolic dim {d!r} arx build does "
                                       f"not know how to bound; re-export the bundle")
                per_bound.append(tuple(dims))
            shapes[t.name] = tuple(per_bound)
        profiles.append(Profile(name, shapes))
    return profiles


def trtexec_shapes(profile: Profile, bound: int) -> str:
    """`name:1x2x3,name2:...` for trtexec's --minShapes (0) / --optShapes (1) / --maxShapes (2)."""
    return ",".join(f"{name}:{'x'.join(map(str, shapes[bound]))}"
                    for name, shapes in profile.shapes.items())


def merged_profile(profiles: list[Profile]) -> Profile:
    """One profile covering all of them (trtexec builds one): min of mins, max of maxes, and the
    decode profile's opt (decode is the latency-critical step that runs most)."""
    decode = next(p for p in profiles if p.name == "decode")
    shapes = {}
    for name, (_, opt, _) in decode.shapes.items():
        lo = tuple(min(d) for d in zip(*(p.shapes[name][0] for p in profiles)))
        hi = tuple(max(d) for d in zip(*(p.shapes[name][2] for p in profiles)))
        shapes[name] = (lo, opt, hi)
    return Profile("all", shapes)
