"""Relaxed acceptance of guessed image tokens (LANTERN, Jang et al., ICLR 2025): `--relax K,DELTA`
beside `--speculate jacobi[:W]`. An explicit opt-in that trades exactness for acceptance.

Image-token models spread their probability over many codes that decode to nearly the same
patch, so an exact rule rejects a guess that is "as good as" the one the model prefers. LANTERN
lets a guess borrow the probability of the codes nearest to it in the VQ codebook's latent space:

    neighbours(d)  the K codes nearest to d (L2 over the vectors the VQ decoder looks up,
                   unit-normalised first where the decoder normalises them, as LlamaGen's does)
    p_d            the guided distribution p with the mass of d's nearest codes moved onto d,
                   nearest first, while the mass moved stays <= DELTA (so TV(p, p_d) <= DELTA)
    judge          the exact rule against p_d instead of p: kept with probability
                   min(1, p_d(d) / q(d)), else a draw from norm(max(p_d - q, 0)); greedy keeps
                   d where it is p_d's argmax

Every token still comes from some p_d within DELTA of p in total variation, not from p itself:
the images drift from the model's distribution, which is why it is opt-in and why the benchmark
(benchmarks/bench_image_speculative.py) prints its quality cost beside its speed. The bonus token
and the Jacobi refinements are drawn from p, as without the relaxation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arx.errors import ArxError

# ops between the VQ decoder's token input and its codebook lookup that do not change the ids
ID_PRESERVING = {"Reshape", "Flatten", "Cast", "Squeeze", "Unsqueeze", "Identity"}
NORMALISING = {"ReduceL2", "LpNormalization"}  # applied to the looked-up vectors: compare unit ones
CHUNK = 1024  # codes per block of the distance matrix (16384 codes: 64 MB a block)


@dataclass(frozen=True)
class Relaxation:
    k: int
    delta: float
    neighbours: np.ndarray  # (codebook, k) int64, nearest first

    def target(self, p: np.ndarray, d: int) -> np.ndarray:
        """p_d: p (codebook,) with the mass of d's nearest codes, nearest first, moved onto d
        while the total moved stays <= delta."""
        near = self.neighbours[d]
        mass = p[near]
        m = int(np.searchsorted(np.cumsum(mass), self.delta, side="right"))
        if m == 0:
            return p
        out = p.copy()
        out[d] += mass[:m].sum()
        out[near[:m]] = 0.0
        return out

    def to_json(self) -> dict:
        return {"method": "lantern", "k": self.k, "delta": self.delta}


def parse_relax(text: str | None) -> tuple[int, float] | None:
    """--relax K,DELTA -> (K, DELTA); None when not given."""
    if text is None:
        return None
    k_text, sep, d_text = text.partition(",")
    try:
        k, delta = int(k_text), float(d_text)
    except ValueError:
        raise ArxError(f"--relax takes K,DELTA (nearest codes, probability mass), e.g. 8,0.2; "
                       f"got {text!r}") from None
    if not sep or k < 1 or not 0.0 < delta <= 1.0:
        raise ArxError(f"--relax K,DELTA needs K >= 1 and 0 < DELTA <= 1 (got {text!r})")
    return k, delta


def relaxation_for(bundle_dir: Path, manifest, info, k: int, delta: float) -> Relaxation:
    """The Relaxation of a class-conditional bundle: its VQ decoder's codebook, K neighbours."""
    vectors = codebook_vectors(Path(bundle_dir), manifest, info.vq_stage)
    size = info.codebook_size or len(vectors)
    if len(vectors) != size:
        raise ArxError(f"the {info.vq_stage} stage's codebook has {len(vectors)} codes, the "
                       f"decoder's logits {size}: re-export the bundle")
    if k >= size:
        raise ArxError(f"--relax K must be below the codebook's {size} codes (got {k})")
    return Relaxation(k, delta, nearest_codes(vectors, k))


def codebook_vectors(bundle_dir: Path, manifest, stage_name: str) -> np.ndarray:
    """(codebook, dim) float32: the table the VQ decoder stage gathers its token input from
    (read alone, not the decoder's other weights), unit rows where the decoder normalises."""
    import onnx
    from onnx import external_data_helper, numpy_helper

    stage = manifest.stages.get(stage_name)
    if stage is None:
        raise ArxError(f"--relax compares codes in the VQ decoder's latent space, and this "
                       f"bundle has no {stage_name} stage; drop --relax")
    model = onnx.load(str(bundle_dir / stage.file), load_external_data=False)
    graph = model.graph
    found = _codebook_gather(graph, stage.inputs[0].name)
    if found is None:
        raise ArxError(f"{stage.file} does not look its tokens up in a codebook table arx can "
                       f"read (a Gather of an initializer); drop --relax")
    tensor, gathered = found
    if external_data_helper.uses_external_data(tensor):
        external_data_helper.load_external_data_for_tensor(tensor, str(bundle_dir))
    vectors = numpy_helper.to_array(tensor).astype(np.float32)
    if any(n.op_type in NORMALISING and gathered in n.input for n in graph.node):
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


def _codebook_gather(graph, token_input: str):
    """(the codebook initializer, the Gather's output) reached from the token input through
    id-preserving ops; None when there is none."""
    inits = {t.name: t for t in graph.initializer}
    names, frontier = {token_input}, [token_input]
    while frontier:
        name = frontier.pop()
        for node in graph.node:
            if name not in node.input:
                continue
            if node.op_type == "Gather" and node.input[1] == name and node.input[0] in inits:
                return inits[node.input[0]], node.output[0]
            if node.op_type in ID_PRESERVING and node.input[0] == name:
                new = [o for o in node.output if o not in names]
                names.update(new)
                frontier.extend(new)
    return None


def nearest_codes(vectors: np.ndarray, k: int) -> np.ndarray:
    """(N, k) the k nearest other codes of each code by L2 distance, nearest first (ties: the
    lower id first), computed a block of rows at a time."""
    v = vectors.astype(np.float32)
    sq = (v * v).sum(1)
    out = np.empty((len(v), k), np.int64)
    for start in range(0, len(v), CHUNK):
        stop = min(start + CHUNK, len(v))
        dist = sq[start:stop, None] - 2.0 * (v[start:stop] @ v.T) + sq[None, :]
        dist[np.arange(stop - start), np.arange(start, stop)] = np.inf  # not its own neighbour
        part = np.argpartition(dist, k - 1, axis=1)[:, :k]
        near = np.take_along_axis(dist, part, axis=1)
        order = np.lexsort((part, near), axis=1)
        out[start:stop] = np.take_along_axis(part, order, axis=1)
    return out
