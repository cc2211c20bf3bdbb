"""The embedder stage, for bundles whose decoder takes embeddings (`arx export --inputs-embeds`).

    input_ids (B,S) int64 ─Gather(embed_tokens.weight (V,H))─► inputs_embeds (B,S,H) float32

The pipeline names it (`pipeline.embed`): the runtime turns token ids (a prompt, a sampled
token) into the decoder's `inputs_embeds` with it, while a caller with other embeddings
(image-token feedback, an encoder prefix) feeds them to the decoder directly. Where the decoder
keeps the table (a tied LM head reads it), the embedder's initializer is a reference into
decoder.onnx.data, so the table is stored once; otherwise the embedder owns it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from arx.export.decoder_graph import B, S
from arx.export.graph import GraphBuilder, save_with_external_data
from arx.manifest import Stage, TensorSpec

EMBEDDER_FILE = "embedder.onnx"
EMBEDDER_STAGE = "embedder"
TABLE = "embed_tokens.weight"


def build_embedder(embed: np.ndarray, decoder_saved: onnx.ModelProto,
                   file: str = EMBEDDER_FILE) -> tuple[onnx.ModelProto, Stage, bool]:
    """(model, stage, shared): `decoder_saved` is the decoder as saved (tensors external);
    shared says the table is the decoder's own (a reference into its data file)."""
    g = GraphBuilder("arx_embedder")
    g.input("input_ids", "int64", (B, S))
    table = next((t for t in decoder_saved.graph.initializer if t.name == TABLE), None)
    if table is None:
        g.weight(TABLE, embed)
    g.node("Gather", [TABLE, "input_ids"], ["inputs_embeds"], name="embed")
    g.output("inputs_embeds", "float32", (B, S, embed.shape[1]))
    model = g.model()
    if table is not None:
        shared = onnx.TensorProto()
        shared.CopyFrom(table)
        model.graph.initializer.append(shared)
    stage = Stage(file, (TensorSpec("input_ids", "int64", (B, S)),),
                  (TensorSpec("inputs_embeds", "float32", (B, S, int(embed.shape[1]))),),
                  token_space="text")
    return model, stage, table is not None


def save_embedder(model: onnx.ModelProto, stage: Stage, bundle: Path, shared: bool) -> None:
    path = Path(bundle) / stage.file
    if shared:  # the table stays where the decoder's data file has it
        onnx.save_model(model, str(path))
    else:
        save_with_external_data(model, path, stage.file + ".data")
