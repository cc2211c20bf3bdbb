"""`arx serve BUNDLE --triton-repo DIR`: a Triton Inference Server model repository.

    DIR/<name>_decoder/config.pbtxt    the ONNX decoder on Triton's onnxruntime backend, with the
                     1/decoder.onnx    sequence batcher and the KV cache as its implicit state
                     1/decoder.onnx.data   (past_key_values.i.* <- present.i.* of the last step)
    DIR/<name>/config.pbtxt            the loop: a decoupled Python backend model that streams
              1/model.py               one response per token (serve/triton_model.py, verbatim)
              1/bundle/                arx.json and the tokenizer files the loop reads

It is a serving configuration of the bundle, not a build (no TensorRT, no target), hence an
option of `arx serve`. Triton keeps each sequence's cache between the loop's requests (one
correlation id per generation); it copies the state every step, where arx's own runtime writes
it in place. The repository is written into a temp folder and renamed into place.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from arx.bundle import atomic_bundle
from arx.errors import ArxError
from arx.manifest import read_manifest

TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16",
         "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int8": "TYPE_INT8"}
MODEL_PY = Path(__file__).with_name("triton_model.py")
IDLE_US = 60_000_000  # a sequence whose loop died is dropped after a minute idle


def write_repo(bundle: str | Path, out: str | Path, *, name: str, max_batch: int,
               overwrite: bool = False) -> Path:
    bundle = Path(bundle)
    m = read_manifest(bundle)
    if not m.kv or m.kv.update != "in_place" or m.kv.scales != "none":
        raise ArxError("--triton-repo needs a bundle with a float in-place KV cache (the "
                       "implicit state of fixed size); export the model from a Hugging Face "
                       "folder, without --kv-dtype")
    if "input_ids" not in {t.name for t in m.decoder.inputs}:
        raise ArxError("--triton-repo needs a decoder that takes input_ids (this one takes "
                       "inputs_embeds); export without --inputs-embeds")
    with atomic_bundle(out, overwrite=overwrite) as tmp:
        decoder = tmp / f"{name}_decoder"
        (decoder / "1").mkdir(parents=True)
        for f in _decoder_files(bundle, m.decoder.file):
            shutil.copy2(bundle / f, decoder / "1" / f)
        (decoder / "config.pbtxt").write_text(decoder_config(m, f"{name}_decoder", max_batch))
        loop = tmp / name
        (loop / "1" / "bundle").mkdir(parents=True)
        shutil.copy2(MODEL_PY, loop / "1" / "model.py")
        for f in ["arx.json", *_text_files(bundle, m)]:
            shutil.copy2(bundle / f, loop / "1" / "bundle" / f)
        (loop / "config.pbtxt").write_text(loop_config(name, f"{name}_decoder"))
    return Path(out)


def _decoder_files(bundle: Path, file: str) -> list[str]:
    """The decoder graph and its external data files (the names the graph refers to)."""
    import onnx

    model = onnx.load(str(bundle / file), load_external_data=False)
    data = {e.value for t in model.graph.initializer for e in t.external_data
            if e.key == "location"}
    return [file, *sorted(data)]


def _text_files(bundle: Path, m) -> list[str]:
    names = [m.tokenizer.file] if m.tokenizer.file else []
    return names + [f for f in ("chat_template.jinja",) if (bundle / f).is_file()]


def _dims(shape) -> str:
    """Triton dims of a tensor without its batch dimension (symbolic dims are -1)."""
    return ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape[1:])


def decoder_config(m, name: str, max_batch: int) -> str:
    stage, kv = m.decoder, m.kv
    state = {past for pair in kv.pairs() for past in pair}
    io = lambda kind, tensors: "\n".join(  # noqa: E731
        f'{kind} {{ name: "{t.name}" data_type: {TYPES[t.dtype]} dims: [ {_dims(t.shape)} ] }}'
        for t in tensors if t.name not in state)
    dims = f"{kv.kv_heads}, {kv.max_seq_len}, {kv.head_dim}"
    states = "\n".join(
        f'  state {{ input_name: "{past}" output_name: "{present}" data_type: '
        f'{TYPES[kv.dtype]} dims: [ {dims} ]\n    initial_state {{ name: "empty" data_type: '
        f'{TYPES[kv.dtype]} dims: [ {dims} ] zero_data: true }} }}' for past, present in kv.pairs())
    return (f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch}\n'
            f'default_model_filename: "{stage.file}"\n{io("input", stage.inputs)}\n'
            f'{io("output", stage.outputs)}\nsequence_batching {{\n'
            f'  max_sequence_idle_microseconds: {IDLE_US}\n'
            f'  oldest {{ max_candidate_sequences: {max_batch} }}\n{states}\n}}\n')


def loop_config(name: str, decoder: str) -> str:
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
            'model_transaction_policy { decoupled: true }\n'
            'input { name: "prompt_ids" data_type: TYPE_INT64 dims: [ -1 ] }\n'
            'input { name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }\n'
            'input { name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true }\n'
            'input { name: "top_k" data_type: TYPE_INT32 dims: [ 1 ] optional: true }\n'
            'input { name: "top_p" data_type: TYPE_FP32 dims: [ 1 ] optional: true }\n'
            'input { name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true }\n'
            'output { name: "token_id" data_type: TYPE_INT64 dims: [ 1 ] }\n'
            'output { name: "text" data_type: TYPE_STRING dims: [ 1 ] }\n'
            f'parameters {{ key: "decoder_model" value {{ string_value: "{decoder}" }} }}\n'
            'instance_group { kind: KIND_CPU count: 1 }\n')
