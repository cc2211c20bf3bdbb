"""The TensorRT form of an image-token bundle (class-conditional protocol, Janus): what differs
from a text decoder's form (builder/tensorrt_form.py does the rest).

    cache rows      [cond; null] (R = 2I rows for I images, runtime/image_generate.py's doubled
                    batch), each row its own length: the null rows are plain batch rows
    sampler         arx::sample with guidance=1: last_logits (R, V) ─Slice codebook─► (R, C)
                    mixed u + s (c - u) inside the plugin, per image: sampling_params (I, 5)
                    (column 4 = the scale, per token under a schedule), presence (I, C), seed
                    (I,) = seed + i, offset (I,) = the drawn token's position ─► token_ids (I,)
                    codebook ids (the runtime feeds offset + id back to both halves)
    host sampling   --sampler none --logits last: last_logits (R, V) for the host sampler
    Janus           the decoder takes inputs_embeds (prompt embeddings from the `embedder`
                    stage, each fed-back token through `image_embed`); both stages stay on ONNX
                    Runtime on the host: a table gather and a 2-layer MLP over (R, 1, H) per
                    token, far cheaper than a second and third engine and their builds
    vq_decoder      its own ONNX and engine in the kit (builder/image_kit.py), not in the form

The codebook slice is what the host loop samples (image_generate._codebook): the filters and
the Philox draw see the codebook's C columns alone, so both faces draw the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from arx.errors import ArxError
from arx.manifest import Manifest
from arx.runtime.engine_session import IMAGE_ROWS  # the guided sampler's row dim: half the batch


@dataclass(frozen=True)
class ImageSampler:
    """Where the image codebook lies in the decoder's logits."""

    offset: int
    size: int
    vocab: int  # the logits' width

    @property
    def sliced(self) -> bool:
        return (self.offset, self.size) != (0, self.vocab)


def image_sampler(manifest: Manifest) -> ImageSampler | None:
    """The codebook of an image-token bundle's logits; None for any other bundle."""
    if manifest.pipeline.kind != "image-tokens":
        return None
    from arx.runtime.image_generate import image_info

    info = image_info(manifest)
    vocab = next(t for t in manifest.decoder.outputs if t.name == "logits").shape[2]
    return ImageSampler(info.codebook_offset, info.codebook_size or vocab, vocab)


def check_image_form(sampler: str, logits: str) -> None:
    """A guided image engine mixes the two halves in arx::sample, or returns the logits for the
    host to mix; an ArgMax has no guidance scale to mix them with."""
    if sampler == "argmax":
        raise ArxError("an image-token engine mixes its guidance in arx::sample or on the host: "
                       "build it with --sampler plugin, or --sampler none --logits last")
    if logits == "verify":
        raise ArxError("--logits verify returns greedy ids for text speculation; an image-token "
                       "engine takes --logits last (or none)")
    if sampler == "none" and logits != "last":
        raise ArxError("an image-token engine without the sampler returns each row's last "
                       "logits for the host sampler: build it with --sampler none --logits last")


def sampler_logits(ed, last_logits: str, codebook: ImageSampler) -> str:
    """(R, V) -> (R, C): the codebook's columns, as the host loop samples them."""
    if not codebook.sliced:
        return last_logits
    return ed.op("Slice", last_logits, ed.const([codebook.offset]),
                 ed.const([codebook.offset + codebook.size]), ed.const([1]),
                 name="head/codebook")


def check_codebook(manifest: Manifest) -> list[int] | None:
    """[offset, size] of the columns an image engine's ids index, for the engine check (and
    kit.json "codebook"); None where ids are logit columns."""
    codebook = image_sampler(manifest)
    return [codebook.offset, codebook.size] if codebook and codebook.sliced else None
