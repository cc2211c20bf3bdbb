"""The loop of a Triton model repository `arx serve --triton-repo` writes (copied there as
model.py; Triton's Python backend runs it, arx never imports it).

A decoupled model: each request (prompt_ids, and optionally max_tokens, temperature, top_k,
top_p, seed) streams one response per generated token (token_id, text), then a final empty
one. Each generation is one sequence of the decoder model, its KV cache the sequence
batcher's implicit state: the prompt as one step with the START flag, then one token a step,
the END flag on the last (an EOS before max_tokens sends one more step to close it). Sampling
is arx's Sampler (the bundle's generation defaults where the request gives nothing), the text
arx's streaming detokenizer. The Python backend's environment needs `pip install arx`.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from arx.manifest import read_manifest
from arx.runtime.sampler import Sampler, SamplingOptions
from arx.runtime.tokenizer import Tokenizer

START = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
END = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.decoder = config["parameters"]["decoder_model"]["string_value"]
        bundle = Path(args["model_repository"]) / args["model_version"] / "bundle"
        self.manifest = m = read_manifest(bundle)
        self.tokenizer = Tokenizer.from_bundle(bundle, m.tokenizer) if m.tokenizer.file else None
        self.inputs = {t.name for t in m.decoder.inputs}
        self.eos = frozenset(m.tokenizer.eos_token_ids)
        self.sequence = 0

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._generate(request, sender)
                sender.send(flags=FINAL)
            except Exception as e:  # noqa: BLE001 - the client gets the error, Triton goes on
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))),
                            flags=FINAL)
        return None

    def _option(self, request, name, default):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return default if tensor is None else tensor.as_numpy().reshape(-1)[0].item()

    def _generate(self, request, sender):
        prompt = pb_utils.get_input_tensor_by_name(request, "prompt_ids").as_numpy()
        prompt = prompt.astype(np.int64).reshape(1, -1)
        g, room = self.manifest.generation, self.manifest.kv.max_seq_len - prompt.shape[1]
        n = self._option(request, "max_tokens", min(g.max_new_tokens, room))
        if not 1 <= n <= room:
            raise ValueError(f"max_tokens must be in 1..{room} for this prompt (got {n})")
        temperature = self._option(request, "temperature", g.temperature if g.do_sample else 0.0)
        sampler = Sampler(SamplingOptions(
            do_sample=temperature > 0, temperature=temperature or 1.0,
            top_k=self._option(request, "top_k", g.top_k),
            top_p=self._option(request, "top_p", g.top_p),
            seed=self._option(request, "seed", None)), self.manifest.vocab_size)
        text = self.tokenizer.stream() if self.tokenizer is not None else None
        self.sequence += 1
        ids, past = prompt, 0
        for i in range(n):
            logits = self._step(ids, past, START * (i == 0) | END * (i == n - 1))
            past += ids.shape[1]
            token = int(sampler(logits, None, np.array([past]))[0])
            piece = text.push(token) if text is not None else ""
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("token_id", np.array([token], np.int64)),
                pb_utils.Tensor("text", np.array([piece.encode()], np.object_))]))
            if token in self.eos:
                if i < n - 1:  # close the sequence: its state slot is free again
                    self._step(np.array([[token]], np.int64), past, END)
                return
            ids = np.array([[token]], np.int64)

    def _step(self, ids, past, flags):
        """One decoder step of this generation's sequence: (1, V) logits of its last token."""
        total = past + ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64),
                 "logits_indices": np.array([[ids.shape[1] - 1]], np.int64),
                 "position_ids": np.arange(past, total, dtype=np.int64)[None]}
        inputs = [pb_utils.Tensor(k, v) for k, v in feeds.items() if k in self.inputs]
        response = pb_utils.InferenceRequest(
            model_name=self.decoder, inputs=inputs, requested_output_names=["logits"],
            correlation_id=self.sequence, flags=int(flags)).exec()
        if response.has_error():
            raise RuntimeError(response.error().message())
        return pb_utils.get_output_tensor_by_name(response, "logits").as_numpy()[:, -1]
