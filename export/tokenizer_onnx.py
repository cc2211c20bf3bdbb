"""tokenizer.onnx: the HF fast tokenizer as one onnxruntime-extensions op, chosen by verification.

ort-extensions 0.15.2 has a custom op, `ai.onnx.contrib::HfJsonTokenizer`, that takes the whole
tokenizer.json plus a tokenizer_config.json as string attributes. It does not interpret the
pipeline declared in tokenizer.json (normalizers, pre-tokenizer regexes, Metaspace schemes);
it picks a hard-coded C++ behaviour from `tokenizer_class` in the config and a few hints in the
JSON (a decoder that replaces "▁" means SentencePiece-style BPE, a `Strip` decoder means "add a
dummy ▁ prefix"). transformers 5 writes class names it does not know ("TokenizersBackend") and
its Python converter (`gen_processing_models`) reads slow-tokenizer attributes that no longer
exist, so neither path works as shipped.

We therefore build the node ourselves: from the structure of tokenizer.json we derive a short
list of candidate (class name, JSON tweak, graph prefix) combinations, build each graph, run it
on the check texts and keep the first whose ids equal the HF tokenizer's on every text. If none
does, tokenizer.onnx is not written and the reason names the first mismatching text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

CONTRIB = "ai.onnx.contrib"
INPUT = "text"  # (N,) string
OUTPUT = "input_ids"  # (N, L) int64, rows padded with pad_token_id (or 0)
_IR_VERSION = 8  # oldest IR that ORT >= 1.14 reads: edge devices lag behind
_OPSET = 17

# Normalizers whose effect ort-extensions does not reproduce. NFC only matters for text that is
# not already NFC (decomposed accents), so it is tolerated and reported as a caveat instead.
_TOLERATED_NORMALIZERS = {"NFC"}


@dataclass(frozen=True)
class Candidate:
    """One way of expressing the tokenizer with HfJsonTokenizer."""

    tokenizer_class: str  # what ort-extensions keys its behaviour on
    strip_dummy_prefix: bool = False  # drop the decoder's Strip so the op adds no "▁" itself
    prefix_space: bool = False  # prepend " " in the graph, the way Metaspace(prepend_scheme=first) does
    unsqueeze: bool = False  # the Unigram kernel returns (L,) instead of (1, L)


@dataclass(frozen=True)
class OnnxResult:
    model: object | None  # onnx.ModelProto when every check text matched
    reason: str | None  # why there is no model
    caveats: tuple[str, ...] = ()
    candidate: Candidate | None = None


def blockers(tok_json: dict) -> tuple[list[str], list[str]]:
    """(reasons the op cannot express this tokenizer, tolerated differences)."""
    model = (tok_json.get("model") or {}).get("type")
    hard, soft = [], []
    if model not in ("BPE", "Unigram"):
        hard.append(f"ort-extensions has no tokenizer.json-driven op for a {model} model")
    for norm in _flatten(tok_json.get("normalizer"), "normalizers"):
        kind = norm.get("type")
        if kind in _TOLERATED_NORMALIZERS:
            soft.append(f"the {kind} normalizer is not applied by tokenizer.onnx: "
                        f"ids differ from HF for text that is not already {kind}")
        elif not _is_spm_normalizer(norm):
            hard.append(f"ort-extensions does not apply the {kind} normalizer")
    return hard, soft


def candidates(tok_json: dict) -> list[Candidate]:
    """The class names (and tweaks) worth trying for this tokenizer.json, best guess first."""
    model = tok_json["model"]["type"]
    if model == "Unigram":
        return [Candidate(c, unsqueeze=True) for c in ("XLMRobertaTokenizer", "T5Tokenizer")]
    pre = _flatten(tok_json.get("pre_tokenizer"), "pretokenizers")
    metaspace = next((p for p in pre if p.get("type") == "Metaspace"), None)
    if metaspace is not None or _decoder_replaces_metaspace(tok_json):
        # SentencePiece-style BPE. The op's own dummy prefix is added after every special
        # token and doubles a leading space; Metaspace(prepend_scheme="first") does neither,
        # so for that scheme the graph adds the prefix and the op adds none.
        first = metaspace is not None and metaspace.get("prepend_scheme") == "first"
        tweaked = [Candidate(c, strip_dummy_prefix=True, prefix_space=True)
                   for c in ("GemmaTokenizer", "LlamaTokenizer")]
        native = [Candidate(c) for c in ("LlamaTokenizer", "GemmaTokenizer")]
        return tweaked + native if first else native + tweaked
    # Byte-level BPE: the class picks the split regex (GPT-2's unless told otherwise).
    return [Candidate(c) for c in ("GPT2Tokenizer", "Qwen2Tokenizer", "LlamaTokenizer")]


def build_model(tok_json: dict, special: dict, add_bos: bool, cand: Candidate, added_tokens: list[str]):
    """The ONNX graph for one candidate.

    text (N,) ─[StringECMARegexReplace: prepend " "]─ HfJsonTokenizer ─[Unsqueeze 0]─ input_ids (N, L)
    (the first and last node only where the candidate asks for them)
    """
    from onnx import TensorProto, helper

    nodes, inits, src = [], [], INPUT
    if cand.prefix_space:
        # Metaspace "first": a "▁" goes before the text unless it is empty, already starts
        # with a space, or starts with an added token (then no piece sits at offset 0).
        avoid = "|".join(["$", " "] + [_ecma_escape(t) for t in added_tokens if t])
        inits += [helper.make_tensor("prefix_pattern", TensorProto.STRING, [1], [f"^(?!{avoid})".encode()]),
                  helper.make_tensor("prefix_rewrite", TensorProto.STRING, [1], [b" "])]
        nodes.append(helper.make_node("StringECMARegexReplace", [src, "prefix_pattern", "prefix_rewrite"],
                                      ["prefixed_text"], domain=CONTRIB, global_replace=0))
        src = "prefixed_text"
    ids = "raw_ids" if cand.unsqueeze else OUTPUT
    config = _config(special, add_bos, cand.tokenizer_class)
    nodes.append(helper.make_node("HfJsonTokenizer", [src], [ids], domain=CONTRIB, name="tokenizer",
                                  tokenizer_vocab=json.dumps(_tweak_json(tok_json, cand), ensure_ascii=False),
                                  tokenizer_config=json.dumps(config)))
    if cand.unsqueeze:
        inits.append(helper.make_tensor("axis0", TensorProto.INT64, [1], [0]))
        nodes.append(helper.make_node("Unsqueeze", [ids, "axis0"], [OUTPUT]))
    graph = helper.make_graph(
        nodes, "arx_tokenizer",
        [helper.make_tensor_value_info(INPUT, TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.INT64, ["N", "L"])], initializer=inits)
    model = helper.make_model(graph, ir_version=_IR_VERSION, producer_name="arx",
                              opset_imports=[helper.make_opsetid("", _OPSET), helper.make_opsetid(CONTRIB, 1)])
    model.doc_string = f"HF tokenizer as onnxruntime-extensions HfJsonTokenizer ({cand.tokenizer_class})"
    return model


def session(model, library_path: str):
    """An ORT CPU session with the extensions' custom-op library registered."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.register_custom_ops_library(library_path)
    opts.log_severity_level = 4  # candidates that fail to load are expected; we report them
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run_ids(sess, text: str) -> list[int]:
    import numpy as np

    out = sess.run([OUTPUT], {INPUT: np.array([text], dtype=object)})[0]
    return out.reshape(-1).tolist()  # one text: the row has no padding


def find_model(tok_json: dict, special: dict, add_bos: bool, expected: list[tuple[str, list[int]]],
               added_tokens: list[str], library_path: str) -> OnnxResult:
    """Try the candidates in order; the first that reproduces every expected id list wins."""
    hard, soft = blockers(tok_json)
    if hard:
        return OnnxResult(None, "; ".join(hard))
    first_failure = None
    for cand in candidates(tok_json):
        model = build_model(tok_json, special, add_bos, cand, added_tokens)
        failure = _first_mismatch(model, expected, library_path)
        if failure is None:
            return OnnxResult(model, None, tuple(soft), cand)
        first_failure = first_failure or f"{cand.tokenizer_class}: {failure}"
    return OnnxResult(None, f"no ort-extensions tokenizer reproduces the HF ids ({first_failure})")


def _first_mismatch(model, expected, library_path) -> str | None:
    # ORT raises its own exception types (Fail, RuntimeException) from a C++ module, hence the
    # broad catch: any failure to load or run a candidate just disqualifies it.
    try:
        sess = session(model, library_path)
    except Exception as e:  # noqa: BLE001
        return f"the op failed to load ({str(e).splitlines()[0][:200]})"
    for text, ids in expected:
        try:
            got = run_ids(sess, text)
        except Exception as e:  # noqa: BLE001
            return f"failed on {text!r} ({str(e).splitlines()[0][:200]})"
        if got != ids:
            at = next((i for i, (a, b) in enumerate(zip(got, ids)) if a != b), min(len(got), len(ids)))
            return (f"{text!r} differs at token {at}: ids[{at}:] are {_short(got[at:], 6)} "
                    f"instead of HF's {_short(ids[at:], 6)}")
    return None


def _config(special: dict, add_bos: bool, tokenizer_class: str) -> dict:
    # A synthesized tokenizer_config.json: only the keys the op reads, with BOS/EOS decided by
    # us (what HF does) instead of by the op's per-class defaults.
    cfg = {"tokenizer_class": tokenizer_class, "add_bos_token": add_bos, "add_eos_token": False}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if special.get(key):
            cfg[key] = special[key]
    return cfg


def _tweak_json(tok_json: dict, cand: Candidate) -> dict:
    out = dict(tok_json)
    # The op adds BOS when the post-processor merely mentions the BOS text; the config's
    # add_bos_token already says what HF does, so the post-processor is dropped.
    out["post_processor"] = None
    if cand.strip_dummy_prefix and isinstance(out.get("decoder"), dict):
        dec = dict(out["decoder"])
        dec["decoders"] = [d for d in dec.get("decoders", []) if d.get("type") != "Strip"]
        out["decoder"] = dec
    if not _decoder_replaces_metaspace(out) and _has_metaspace(out) and out["model"]["type"] == "BPE":
        # The op recognises SentencePiece BPE only by a Replace("▁", " ") decoder step.
        out["decoder"] = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]}
    return out


def _flatten(node, key: str) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [leaf for child in node.get(key, []) for leaf in _flatten(child, key)]
    return [node]


def _is_spm_normalizer(norm: dict) -> bool:
    # Legacy SentencePiece pipelines spell the ▁ handling as normalizers; the op does the same
    # thing natively, and verification catches any difference.
    if norm.get("type") == "Prepend":
        return norm.get("prepend") == "\u2581"
    if norm.get("type") == "Replace":
        return norm.get("pattern", {}).get("String") == " " and norm.get("content") == "\u2581"
    return norm.get("type") == "Precompiled"


def _has_metaspace(tok_json: dict) -> bool:
    return any(p.get("type") == "Metaspace" for p in _flatten(tok_json.get("pre_tokenizer"), "pretokenizers"))


def _decoder_replaces_metaspace(tok_json: dict) -> bool:
    return any(d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "\u2581"
               for d in _flatten(tok_json.get("decoder"), "decoders"))


def _ecma_escape(text: str) -> str:
    return "".join("\\" + c if c in "\\^$.*+?()[]{}|/-" else c for c in text)


def _short(ids: list[int], n: int = 12) -> str:
    return str(ids) if len(ids) <= n else str(ids[:n])[:-1] + ", ...]"
