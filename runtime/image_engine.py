"""The image loop (runtime/image_generate.grid_loop) on a TensorRT engine (engine_session.py).

    rows      [cond; null] in the engine's static cache, each row its own length
    prefix    class ids as input_ids; Janus: the prompt's embeddings (its `embedder` stage, on
              ONNX Runtime) as inputs_embeds
    feedback  offset + id to both halves; Janus: through the `image_embed` stage on ONNX
              Runtime (a gather and a 2-layer MLP per token, cheaper than an engine of its own)
    tokens    an engine with arx::sample (guidance=1, builder/image_form.py) draws them itself:
              sampling_params (I, 5) with token k's guidance scale in column 4, seed + i per
              image, offset = the token's position, row = 0; an engine built with --sampler
              none --logits last returns last_logits and the host samples them as on ONNX
              Runtime

Row 0 for every image is the host loop's rule (image_generate._choose draws each image alone,
so an image does not depend on the batch it is in): with arx::sample's row term at zero the
device batch draws exactly the host's ids, so seeded grids equal the ORT run's at any batch.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from arx.errors import ArxError
from arx.plugins.sampling.reference import COL
from arx.runtime.backend import BackendOptions, open_stage
from arx.runtime.engine_session import EngineSession
from arx.runtime.sampler import SamplingOptions


class ImageEngineSession:
    """An EngineSession with the image loop's session API (the step API of runtime/decoder.py,
    plus `draws`/`start`/`draw` where the engine samples)."""

    ragged = True

    def __init__(self, engine: EngineSession, bundle_dir: str | Path,
                 options: BackendOptions = BackendOptions()):
        self.engine, self.manifest = engine, engine.manifest
        self.bundle_dir, self.options = Path(bundle_dir), options  # for the embedder stages
        self._embedder = None
        self._embeds = "inputs_embeds" in engine.inputs

    @property
    def draws(self) -> bool:
        """Whether the engine draws the image tokens itself (arx::sample with guidance)."""
        return "sampling_params" in self.engine.inputs

    def new_cache(self, rows: int, max_len: int | None = None):
        return self.engine.new_cache(rows, max_len)

    def step(self, cache, ids, new_lens, logits: str = "last", inputs_embeds=None) -> np.ndarray:
        ids, embeds = self._tokens(ids, inputs_embeds)
        return self.engine.step(cache, ids, new_lens, logits, inputs_embeds=embeds)

    def start(self, cache, sampling: SamplingOptions, seeds: list[int | None]) -> None:
        """Set the engine's sampler inputs for these images (seed + i each; greedy: unused)."""
        if cache.lengths.shape[0] != 2 * len(seeds):
            raise ArxError("this engine mixes guidance in arx::sample over [cond; null] rows; "
                           "--cfg 1 (no guidance) runs on ONNX Runtime (drop --engine) or on an "
                           "engine built with --sampler none --logits last")
        self.engine.device_sampling(cache, replace(sampling, seed=0), None)  # seeds below
        cache.sampler_feeds["seed"] = np.array([s or 0 for s in seeds], np.int64)
        cache.sampler_feeds["row"] = np.zeros(len(seeds), np.int64)  # each image alone

    def draw(self, cache, ids, new_lens, scale: float, inputs_embeds=None) -> np.ndarray:
        """(I,) codebook ids of the next token of each image, guided by `scale`."""
        params = cache.sampler_feeds["sampling_params"]
        params[:, COL["cfg_scale"]] = scale
        ids, embeds = self._tokens(ids, inputs_embeds)
        return self.engine.step_tokens(cache, ids, new_lens, inputs_embeds=embeds)

    def close(self) -> None:
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None

    def _tokens(self, ids, inputs_embeds):
        """(ids, embeds) as the engine takes them: ids through image_embed where it reads
        embeddings (Janus' feedback)."""
        if not self._embeds or inputs_embeds is not None:
            return ids, inputs_embeds
        if self._embedder is None:
            self._embedder = open_stage(self.bundle_dir, self.manifest,
                                        self.manifest.pipeline.embed, self.options)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        return None, self._embedder.run({"input_ids": ids})["inputs_embeds"]
