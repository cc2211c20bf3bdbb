"""The TensorRT form of a next-scale (VAR) bundle, run by ONNX Runtime (plugins as NumPy PyOps).

The form takes inputs_embeds, steps every row with the block mask (the arx::kv_attention
plugin's mask="block", or ONNX Attention with every row flagged block), and returns every
position's logits for the host sampler. Its logits over the whole schedule (the SOS step, then
one step per scale after the cache of all earlier ones) equal the bundle's own general-step
graph on the same embeddings; the profiles are the schedule's block widths.
"""

from __future__ import annotations

import numpy as np
import pytest
from form_runs import form_for
from var_bundle import export_var_bundle

from arx.builder.options import BuildOptions
from arx.builder.profiles import block_widths, make_profiles
from arx.errors import ArxError
from arx.manifest import read_manifest
from arx.runtime.decoder import DecoderSession

S_MAX = 66  # the schedule's 1 + 4 + 9 + 16 + 36 tokens
FORM = {"sampler": "none", "logits": "all", "max_seq_len": S_MAX}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return export_var_bundle(tmp_path_factory.mktemp("var"))[1]


def _schedule(manifest, batch: int = 2):
    """(inputs_embeds (B, n, Cvae + D)) per scale: random features, fixed per-row conditions."""
    rng = np.random.default_rng(0)
    width = manifest.decoder.inputs[0].shape[-1]
    cond = rng.standard_normal((batch, 1, width - 8)).astype(np.float32)
    steps = []
    for pn in manifest.extensions["var"]["patch_nums"]:
        feat = rng.standard_normal((batch, pn * pn, 8)).astype(np.float32)
        steps.append(np.concatenate([feat, np.repeat(cond, pn * pn, axis=1)], axis=-1))
    return steps


def _reference(bundle, steps):
    with DecoderSession(bundle) as session:
        cache = session.new_cache(len(steps[0]), S_MAX)
        return [session.step(cache, None, np.full(len(e), e.shape[1]), logits="all",
                             mask="block", inputs_embeds=e) for e in steps]


def _run(ort_session, model, manifest, steps):
    session = ort_session(model)
    types = {i.name for i in session.get_inputs()}
    kv, b = manifest.kv, len(steps[0])
    caches = {p: np.zeros((b, kv.kv_heads, S_MAX, kv.head_dim), np.float32) for p, _ in kv.pairs()}
    lengths, out = np.zeros(b, np.int64), []
    names = [o.name for o in session.get_outputs()]
    for embeds in steps:
        n = embeds.shape[1]
        feeds = {"inputs_embeds": embeds, "past_lengths": lengths, "new_lengths": np.full(b, n),
                 "position_ids": lengths[:, None] + np.arange(n)[None], **caches}
        got = dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in types})))
        for past, present in kv.pairs():
            caches[past] = got[present]  # ORT has no aliasing: feed the updated cache back
        lengths = lengths + n
        out.append(got["logits"])
    return out


@pytest.mark.parametrize("attention", ["native", "plugin"])
def test_form_logits_of_every_scale_equal_the_bundle(bundle, ort_session, attention):
    manifest = read_manifest(bundle)
    steps = _schedule(manifest)
    form = form_for(bundle, attention=attention, **FORM)
    assert [t.name for t in form.stage.outputs][0] == "logits"
    assert form.stage.inputs[0].name == "inputs_embeds"
    for k, (got, ref) in enumerate(zip(_run(ort_session, form.model, manifest, steps),
                                       _reference(bundle, steps))):
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=f"scale {k}")


def test_profiles_are_the_block_widths(bundle):
    manifest = read_manifest(bundle)
    form = form_for(bundle, attention="native", **FORM)
    options = BuildOptions(target="h100", max_seq_len=S_MAX, sampler="none", logits="all",
                           max_batch=4)
    profiles = make_profiles(form.stage, options, S_MAX, block_widths(manifest))
    assert [p.name for p in profiles] == ["decode", "scale_4", "scale_9", "scale_16", "scale_36"]
    for p, w in zip(profiles, (1, 4, 9, 16, 36)):
        lo, opt, hi = p.shapes["inputs_embeds"]
        assert lo[1] == opt[1] == hi[1] == w and (lo[0], hi[0]) == (1, 4)


def test_form_needs_host_sampling_and_build_is_refused(bundle, tmp_path):
    with pytest.raises(ArxError, match="--sampler none --logits all"):
        form_for(bundle, attention="native", max_seq_len=S_MAX)
    from arx.builder.build import build_bundle

    before = sorted(p.name for p in bundle.iterdir())
    with pytest.raises(ArxError, match="next-scale"):
        build_bundle(bundle, BuildOptions(target="h100", kit=True, output=tmp_path / "kit",
                                          progress=False, **FORM))
    assert sorted(p.name for p in bundle.iterdir()) == before and not (tmp_path / "kit").exists()
