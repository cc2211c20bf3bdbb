"""Parity of a next-scale bundle at export: every stage against the module on the same inputs.

The decoder runs the whole schedule as the runtime does (batch 2, a cond and a null row, the
width-1 SOS step on the fused graph, then one block step per scale on the general-step graph
with the block mask) against the module's forward growing its own cache; the class, next-input
and pixel stages take random inputs at batch 3 (a batch neither trace used).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from arx.export.parity import ParityReport, raise_if_failed


def var_parity(module, vae, bundle: Path, manifest, atol: float, options) -> dict:
    spec = manifest.extensions["var"]
    pns = spec["patch_nums"]
    report = ParityReport(options.atol or atol, batch=2,
                          prompt_lengths=tuple(p * p for p in pns), decode_steps=len(pns) - 1)
    rng = np.random.default_rng(options.seed)
    _decoder(module, bundle, manifest, spec, report, rng)
    _stages(module, vae, bundle, manifest, spec, report, rng)
    raise_if_failed(report, "nothing was written")
    return report.to_json()


def _decoder(module, bundle: Path, manifest, spec: dict, report: ParityReport, rng) -> None:
    import torch

    from arx.runtime.decoder import DecoderSession

    kv = manifest.kv
    with torch.no_grad():
        cond = module.class_emb(torch.tensor([0, spec["null_class"]])).numpy()  # (2, D)
    past = [(torch.zeros(2, kv.kv_heads, 0, kv.head_dim),) * 2 for _ in range(kv.layers)]
    cur = 0
    with DecoderSession(bundle, manifest=manifest) as session:
        cache = session.new_cache(2, spec["tokens"])
        try:
            for k, pn in enumerate(spec["patch_nums"]):
                n = pn * pn
                feat = rng.standard_normal((2, n, spec["feature_dim"])).astype(np.float32)
                embeds = np.concatenate([feat, np.repeat(cond[:, None], n, axis=1)], axis=-1)
                got = session.step(cache, None, np.full(2, n), logits="all", mask="block",
                                   inputs_embeds=embeds)
                pos = torch.arange(cur, cur + n)[None].repeat(2, 1)
                with torch.no_grad():
                    ref, past = module(torch.from_numpy(embeds), pos, past)
                report.stat("logits/scale").update(got, ref.numpy(), f"scale {k} ({pn}x{pn})")
                cur += n
        finally:
            cache.close()


def _stages(module, vae, bundle: Path, manifest, spec: dict, report: ParityReport, rng) -> None:
    import torch

    from arx.runtime.backend import OrtBackend
    from arx.export.var_stages import _next_input_module

    hw, cvae, vocab = spec["latent"][0], spec["feature_dim"], manifest.vocab_size
    f_hat = rng.standard_normal((3, cvae, hw, hw)).astype(np.float32)
    classes = np.array([0, spec["num_classes"] - 1, spec["null_class"]], np.int64)
    cases = [(spec["class_stage"], {"class_ids": classes}, lambda f: module.class_emb(*f))]
    for k, pn in enumerate(spec["patch_nums"]):
        tokens = rng.integers(0, vocab, (3, pn * pn)).astype(np.int64)
        step = _next_input_module(vae, k, len(spec["patch_nums"]))
        cases.append((spec["next_input_stages"][k], {"tokens": tokens, "f_hat": f_hat},
                      lambda f, step=step: step(*f)))
    cases.append((spec["pixels"]["stage"], {"f_hat": f_hat}, lambda f: vae.fhat_to_img(*f)))
    for name, feeds, fn in cases:
        stage = manifest.stages[name]
        with OrtBackend(bundle / stage.file) as backend:
            got = backend.run(feeds)
        with torch.no_grad():
            ref = fn([torch.from_numpy(feeds[t.name]) for t in stage.inputs])
        refs = ref if isinstance(ref, tuple) else (ref,)
        for out, r in zip(stage.outputs, refs):
            report.stat(f"{name}.{out.name}").update(got[out.name], r.numpy(), name)
