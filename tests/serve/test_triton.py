"""`arx serve --triton-repo`: the model repository checked structurally (config.pbtxt parsed,
state names and dims against the bundle's KV layout, the decoder files loadable, model.py
compiled), then its loop run against a stand-in for Triton built from what config.pbtxt says
(ORT runs the copied decoder; the implicit state is kept per correlation id, zeroed at START):
its greedy tokens equal `generate`'s. No Triton here, so nothing runs the real server."""

from __future__ import annotations

import re
import sys
import types

import numpy as np
import pytest

from arx.cli import main
from arx.manifest import read_manifest
from arx.runtime.decoder import DecoderSession
from arx.runtime.generate import GenerateOptions, generate
from arx.runtime.sampler import SamplingOptions

TOKEN = re.compile(r'\s*(?:(#[^\n]*)|([{}\[\]:,])|("(?:[^"\\]|\\.)*")|([^\s{}\[\]:,"]+))')


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format -> {field: [values]} (messages are dicts, lists flattened)."""
    tokens = [t for c, p, q, w in TOKEN.findall(text) if not c for t in [p or q or w] if t]
    pos = 0

    def value():
        nonlocal pos
        t = tokens[pos]
        pos += 1
        if t == "{":
            return message("}")
        if t == "[":
            out = []
            while tokens[pos] != "]":
                if tokens[pos] == ",":
                    pos += 1
                    continue
                out.append(value())
            pos += 1
            return out
        if t.startswith('"'):
            return t[1:-1]
        return int(t) if re.fullmatch(r"-?\d+", t) else t

    def message(end):
        nonlocal pos
        out: dict = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            v = value()
            out.setdefault(key, []).extend(v if isinstance(v, list) else [v])
        pos += 1
        return out

    return message(None)


@pytest.fixture(scope="module")
def repo(chat_bundle, tmp_path_factory):
    _, bundle = chat_bundle
    out = tmp_path_factory.mktemp("triton") / "repo"
    assert main(["serve", str(bundle), "--triton-repo", str(out), "--model-name", "tiny",
                 "--max-batch", "4"]) == 0
    return bundle, out


def test_the_repository_matches_the_bundle(repo):
    bundle, out = repo
    m = read_manifest(bundle)
    dec = parse_pbtxt((out / "tiny_decoder" / "config.pbtxt").read_text())
    assert dec["backend"] == ["onnxruntime"] and dec["max_batch_size"] == [4]
    states = dec["sequence_batching"][0]["state"]
    assert [(s["input_name"][0], s["output_name"][0]) for s in states] == m.kv.pairs()
    kv = m.kv
    for s in states:
        assert s["dims"] == [kv.kv_heads, kv.max_seq_len, kv.head_dim]
        assert s["data_type"] == ["TYPE_FP32"] and s["initial_state"][0]["zero_data"] == ["true"]
    past = {p for pair in kv.pairs() for p in pair}
    assert [i["name"][0] for i in dec["input"]] == \
        [t.name for t in m.decoder.inputs if t.name not in past]
    assert [o["name"][0] for o in dec["output"]] == ["logits"]
    assert dec["output"][0]["dims"] == [-1, m.vocab_size]
    import onnx

    model = onnx.load(str(out / "tiny_decoder" / "1" / dec["default_model_filename"][0]))
    assert {i.name for i in model.graph.input} >= {p for p, _ in kv.pairs()}  # weights loaded
    assert {o.name for o in model.graph.output} >= {o for _, o in kv.pairs()}
    loop = parse_pbtxt((out / "tiny" / "config.pbtxt").read_text())
    assert loop["backend"] == ["python"]
    assert loop["model_transaction_policy"][0]["decoupled"] == ["true"]
    assert loop["parameters"][0]["value"][0]["string_value"] == ["tiny_decoder"]
    compile((out / "tiny" / "1" / "model.py").read_text(), "model.py", "exec")
    assert (out / "tiny" / "1" / "bundle" / "tokenizer.json").is_file()


class FakeTriton:
    """What the loop needs of triton_python_backend_utils, with the decoder model served as
    config.pbtxt says: ORT on its file, the implicit state per correlation id."""

    def __init__(self, decoder_dir):
        import onnxruntime as ort

        config = parse_pbtxt((decoder_dir / "config.pbtxt").read_text())
        self.ort = ort.InferenceSession(str(decoder_dir / "1" / config["default_model_filename"][0]))
        self.states = [(s["input_name"][0], s["output_name"][0], s["dims"])
                       for s in config["sequence_batching"][0]["state"]]
        self.live, self.sent = {}, []
        self.module = self._module()

    def _module(self):
        fake, triton = types.ModuleType("triton_python_backend_utils"), self
        fake.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START, fake.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 1, 2
        fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

        class Tensor:
            def __init__(self, name, array):
                self.name, self.array = name, array

            def as_numpy(self):
                return self.array

        class InferenceRequest:
            def __init__(self, model_name, inputs, requested_output_names, correlation_id, flags):
                self.inputs, self.id, self.flags = inputs, correlation_id, flags

            def exec(self):
                return triton.run(self)

        class InferenceResponse:
            def __init__(self, output_tensors=(), error=None):
                self.output_tensors, self.error = list(output_tensors), error

            def has_error(self):
                return self.error is not None

        fake.Tensor, fake.InferenceRequest, fake.InferenceResponse = Tensor, InferenceRequest, InferenceResponse
        fake.TritonError = lambda message: message
        fake.get_input_tensor_by_name = lambda r, n: next((t for t in r.inputs if t.name == n), None)
        fake.get_output_tensor_by_name = lambda r, n: next(t for t in r.output_tensors if t.name == n)
        return fake

    def run(self, request):
        if request.flags & 1:
            self.live[request.id] = {i: np.zeros([1, *d], np.float32) for i, _, d in self.states}
        state = self.live[request.id]
        feeds = {t.name: t.array for t in request.inputs} | state
        names = ["logits"] + [o for _, o, _ in self.states]
        out = dict(zip(names, self.ort.run(names, feeds)))
        self.live[request.id] = {i: out[o] for i, o, _ in self.states}
        if request.flags & 2:
            del self.live[request.id]
        return self.module.InferenceResponse([self.module.Tensor("logits", out["logits"])])


def test_the_loop_on_a_stand_in_triton_equals_generate(repo, monkeypatch):
    bundle, out = repo
    triton = FakeTriton(out / "tiny_decoder")
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", triton.module)
    model_py = types.ModuleType("model")
    exec(compile((out / "tiny" / "1" / "model.py").read_text(), "model.py", "exec"), model_py.__dict__)
    config = (out / "tiny" / "config.pbtxt").read_text()
    loop = model_py.TritonPythonModel()
    loop.initialize({"model_config": _as_json(config), "model_repository": str(out / "tiny"),
                     "model_version": "1"})
    pb = triton.module
    prompts = [[1, 5, 6, 7, 8], [1, 9, 10]]
    responses = {}

    class Request:
        def __init__(self, k, prompt):
            self.k, self.inputs = k, [pb.Tensor("prompt_ids", np.array(prompt, np.int64)),
                                      pb.Tensor("max_tokens", np.array([10], np.int32)),
                                      pb.Tensor("temperature", np.array([0.0], np.float32))]

        def get_response_sender(self):
            sender = types.SimpleNamespace()
            sender.send = lambda r=None, flags=0: responses.setdefault(self.k, []).append((r, flags))
            return sender

    loop.execute([Request(k, p) for k, p in enumerate(prompts)])
    with DecoderSession(bundle) as session:
        want = generate(session, prompts, GenerateOptions(max_new_tokens=10,
                                                          sampling=SamplingOptions())).tokens
    for k, prompt in enumerate(prompts):
        sent = responses[k]
        assert sent[-1] == (None, 1) and all(r.error is None for r, _ in sent[:-1])
        got = [int(pb.get_output_tensor_by_name(r, "token_id").array[0]) for r, _ in sent[:-1]]
        assert got == list(want[k])
    assert triton.live == {}  # every sequence ended: Triton's state slots are free


def _as_json(pbtxt: str) -> str:
    """model_config as Triton hands it to initialize(): JSON of the config (the parameters)."""
    import json

    params = parse_pbtxt(pbtxt)["parameters"]
    return json.dumps({"parameters": {p["key"][0]: {"string_value": p["value"][0]["string_value"][0]}
                                      for p in params}})


def test_refusals_are_one_line(repo, capsys):
    bundle, out = repo
    assert main(["serve", str(bundle), "--triton-repo", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["serve", str(out), "--triton-repo", str(out.parent / "x")]) == 2
    assert "not an arx bundle" in capsys.readouterr().err
    assert not (out.parent / "x").exists()
