"""Speculative decoding, greedy: token for token the target's plain greedy decoding, with a draft
bundle (the target itself: everything accepted; a perturbed copy: some; another family: almost
nothing) and with prompt lookup, batch 3 of ragged prompts, fixed and adaptive k; the lookup
rule equals Hugging Face's; the draft must share the tokenizer; the CLI's flags and report."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from arx.cli import main
from arx.errors import ArxError
from arx.manifest import TokenizerInfo, read_manifest
from arx.runtime.decoder import DecoderSession
from arx.runtime.generate import GenerateOptions, generate
from arx.runtime.proposers import check_same_tokenizer, lookup, open_proposer
from arx.runtime.sampler import SamplingOptions
from arx.runtime.speculative import SpeculativeOptions, generate_speculative
from cli_lines import assert_one_line

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[1, 17, 33, 99, 5, 12, 80, 41, 7], [1, 64, 3], [1, 150, 20, 20, 9, 31]]
NEW = 40
SPECS = {"1": SpeculativeOptions(k=1), "3": SpeculativeOptions(k=3),
         "auto": SpeculativeOptions(adaptive=True)}


@pytest.fixture(scope="module")
def perturbed_draft(hf_model_dir, tmp_path_factory):
    """family -> a bundle of the family's tiny model with noise on every weight: a draft that
    agrees with the target often, not always."""
    import torch
    from arx.export.exporter import ExportOptions, export_model

    cache = {}

    def get(family: str):
        if family not in cache:
            model = copy.deepcopy(hf_model_dir(family)[1])
            gen = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for w in model.parameters():
                    w.add_(0.04 * w.std().nan_to_num(0) * torch.randn(w.shape, generator=gen))
            folder = tmp_path_factory.mktemp(f"draft-{family}")
            model.save_pretrained(folder / "hf")
            export_model(source=folder / "hf", output=folder / "draft.arx",
                         options=ExportOptions(progress=False))
            cache[family] = folder / "draft.arx"
        return cache[family]

    return get


def _plain(bundle, prompts, options):
    with DecoderSession(bundle) as session:
        return generate(session, prompts, options)


def _speculative(bundle, proposer_of, prompts, options, spec):
    with DecoderSession(bundle) as session:
        with proposer_of() as proposer:
            return generate_speculative(session, proposer, prompts, options, spec)


def _draft(target, path):
    return lambda: open_proposer(read_manifest(target), target, draft=path)


@pytest.mark.parametrize("k", sorted(SPECS))
@pytest.mark.parametrize("draft", ["self", "perturbed", "qwen2"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_greedy_with_a_draft_is_plain_greedy(family, draft, k, exported_bundle, perturbed_draft):
    """Mistral's rows pass its sliding window (24) inside verify steps."""
    target = exported_bundle(family)
    path = {"self": target, "perturbed": perturbed_draft(family) if draft == "perturbed" else None,
            "qwen2": exported_bundle("qwen2")}[draft]
    options = GenerateOptions(max_new_tokens=NEW, stop_on_eos=False)
    want = _plain(target, PROMPTS, options)
    got = _speculative(target, _draft(target, path), PROMPTS, options, SPECS[k])
    assert got.tokens == want.tokens
    s = got.speculation
    assert s.produced == sum(map(len, got.tokens)) - len(PROMPTS)  # all but the prefill's
    if draft == "self":  # the target agrees with itself: every proposal kept
        assert s.acceptance_rate == 1.0 and s.tokens_per_target_step > 1.9
    if draft == "perturbed":  # rows keep different numbers of tokens per step
        assert 0.1 < s.acceptance_rate < 1.0, s.to_json()
    if draft == "qwen2" and k == "auto":  # k falls to 0: plain steps, a retry every 9th
        assert s.proposing_steps < 0.5 * s.row_steps, s.to_json()


def test_acceptance_is_per_row(exported_bundle, perturbed_draft):
    """A row's result does not depend on the others: each prompt alone gives its batch row."""
    target, draft = exported_bundle("llama"), perturbed_draft("llama")
    options = GenerateOptions(max_new_tokens=NEW, stop_on_eos=False)
    batch = _speculative(target, _draft(target, draft), PROMPTS, options, SPECS["auto"])
    for b, p in enumerate(PROMPTS):
        alone = _speculative(target, _draft(target, draft), [p], options, SPECS["auto"])
        assert alone.tokens[0] == batch.tokens[b]


def test_eos_and_repetition_penalty_inside_accepted_runs(exported_bundle, tmp_path):
    """EOS set to a token the rows emit mid-way: a row stops at it even inside a run of accepted
    proposals, the others go on; the penalty counts proposals before each verified position."""
    source = exported_bundle("llama")
    options = GenerateOptions(max_new_tokens=NEW, stop_on_eos=True,
                              sampling=SamplingOptions(repetition_penalty=1.3))
    free = _plain(source, PROMPTS, options).tokens
    eos = free[0][NEW // 2]  # first row's 21st token; it stops there
    bundle = tmp_path / "eos.arx"
    shutil.copytree(source, bundle)
    meta = json.loads((bundle / "arx.json").read_text())
    meta["tokenizer"]["eos_token_ids"] = [eos]
    (bundle / "arx.json").write_text(json.dumps(meta))
    want = _plain(bundle, PROMPTS, options)
    assert "eos" in want.finish_reasons and len(want.tokens[0]) <= NEW // 2 + 1
    for spec in SPECS.values():
        got = _speculative(bundle, _draft(bundle, bundle), PROMPTS, options, spec)
        assert (got.tokens, got.finish_reasons) == (want.tokens, want.finish_reasons)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """The embedded trained model (models/arx-tiny) with its tokenizer: it copies text it has
    seen, which is what prompt lookup needs (random tiny models never repeat themselves)."""
    from arx.export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp("tiny") / "tiny.arx"
    export_model(source=ROOT / "models" / "arx-tiny", output=out,
                 options=ExportOptions(progress=False))
    return out


def test_prompt_lookup_greedy_is_plain_greedy(tiny_bundle):
    """Prompts that quote a story and start it again (a code-editing prompt's shape): lookup
    proposes the quoted text, the target keeps most of it, and the tokens are plain greedy's."""
    from arx.runtime.tokenizer import Tokenizer

    m = read_manifest(tiny_bundle)
    tok = Tokenizer.from_bundle(tiny_bundle, m.tokenizer)
    stories = (ROOT / "models" / "arx-tiny" / "eval.txt").read_text().splitlines()[:3]
    prompts = [tok.encode(f"{s}\n{s[:n]}") for s, n in zip(stories, (60, 30, 45))]
    options = GenerateOptions(max_new_tokens=NEW, stop_on_eos=False)
    want = _plain(tiny_bundle, prompts, options)
    for spec in SPECS.values():
        got = _speculative(tiny_bundle, lambda: open_proposer(m, tiny_bundle, lookup=2), prompts,
                           options, spec)
        assert got.tokens == want.tokens
        s = got.speculation  # measured: 27-38 of 117 tokens came from kept proposals
        assert s.accepted > 20 and s.tokens_per_target_step > 1.25, s.to_json()


def test_lookup_equals_hugging_face_prompt_lookup():
    """The n-gram rule (n from 2 down to 1, leftmost match, cut at EOS) against transformers'
    PromptLookupCandidateGenerator on random texts over a small alphabet (many matches)."""
    import torch
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    rng = np.random.default_rng(0)
    for trial in range(300):
        text = rng.integers(0, 6, int(rng.integers(1, 30)))
        want, ngram = int(rng.integers(1, 8)), int(rng.integers(1, 4))
        hf = PromptLookupCandidateGenerator(eos_token_id=torch.tensor([5]), num_output_tokens=want,
                                            max_matching_ngram_size=ngram, max_length=1000)
        ids = torch.from_numpy(text)[None]
        cand, _ = hf.get_candidates(ids)
        expected = cand[0, len(text):].tolist()
        assert lookup(text, ngram, want, np.array([5])).tolist() == expected, (trial, text)


def test_draft_needs_the_same_tokenizer(exported_bundle, tmp_path):
    target = exported_bundle("llama")
    m = read_manifest(target)
    other = copy.copy(m)
    other.vocab_size = m.vocab_size + 8
    with pytest.raises(ArxError, match="vocabulary of 168 tokens, the target 160"):
        check_same_tokenizer(m, target, other, tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "tokenizer.json").write_text('{"model": {"vocab": {"x": 0}}, "version": "1.0"}')
    (b / "tokenizer.json").write_text('{"version": "1.0",\n "model": {"vocab": {"x": 0}}}')
    with_tok = copy.copy(m)
    with_tok.tokenizer = TokenizerInfo(file="tokenizer.json")
    check_same_tokenizer(with_tok, a, with_tok, b)  # same content, other formatting: fine
    (b / "tokenizer.json").write_text('{"version": "1.0", "model": {"vocab": {"y": 0}}}')
    with pytest.raises(ArxError, match="another tokenizer than the target"):
        check_same_tokenizer(with_tok, a, with_tok, b)
    with pytest.raises(ArxError, match="draft bundle has no tokenizer.json"):
        check_same_tokenizer(with_tok, a, m, b)


def _cli(capsys, *argv):
    capsys.readouterr()  # not what fixtures printed while building models
    code = main(list(map(str, argv)))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


def test_cli_draft_and_lookup_report(exported_bundle, capsys):
    bundle = exported_bundle("llama")
    ids = ["--prompt-ids", "1,17,33,99", "--prompt-ids", "1,64,3", "--max-new-tokens", "24",
           "--greedy", "--no-eos-stop"]
    plain = json.loads(_cli(capsys, "generate", bundle, *ids, "--json").stdout)
    for extra in (["--draft", bundle, "--speculate", "3"], ["--lookup", "2"],
                  ["--draft", bundle, "--speculate", "auto"]):
        proc = _cli(capsys, "generate", bundle, *ids, *extra, "--json")
        got = json.loads(proc.stdout)
        assert [s["tokens"] for s in got["sequences"]] == [s["tokens"] for s in plain["sequences"]]
        spec = got["speculation"]
        assert spec["method"] == ("lookup" if "--lookup" in extra else "draft")
        assert {"acceptance_rate", "mean_accepted", "tokens_per_target_step"} <= set(spec)
        assert "tokens per target step" in proc.stderr
    assert json.loads(_cli(capsys, "generate", bundle, *ids, "--draft", bundle, "--speculate",
                           "2", "--json").stdout)["speculation"]["acceptance_rate"] == 1.0


@pytest.mark.parametrize("extra, fragment", [
    (["--speculate", "3"], "--speculate needs a proposer"),
    (["--draft", "SELF", "--speculate", "0"], "--speculate takes a number of tokens >= 1"),
    (["--draft", "SELF", "--speculate", "many"], "--speculate takes a number of tokens or 'auto'"),
    (["--draft", "SELF", "--lookup", "2"], "not both"),
    (["--lookup", "0"], "--lookup takes the longest n-gram"),
    (["--draft", "NOPE"], "does not exist"),
])
def test_cli_refuses_bad_speculation_flags(extra, fragment, exported_bundle, tmp_path, capsys):
    bundle = exported_bundle("llama")
    extra = [{"SELF": bundle, "NOPE": tmp_path / "nope.arx"}.get(x, x) for x in extra]
    proc = _cli(capsys, "generate", bundle, "--prompt-ids", "1,2,3", "--json", *extra)
    assert_one_line(proc, fragment)


def test_cli_refuses_speculation_on_image_tokens(exported_bundle, capsys):
    proc = _cli(capsys, "generate", exported_bundle("llama"), "--class", "3", "--lookup", "2")
    assert_one_line(proc, "image-token bundles speculate with --speculate jacobi")


def test_cli_refuses_a_draft_of_another_vocabulary(exported_bundle, tmp_path, capsys):
    draft = tmp_path / "draft.arx"
    shutil.copytree(exported_bundle("llama"), draft)
    meta = json.loads((draft / "arx.json").read_text())
    meta["vocab_size"] = 200
    meta["token_spaces"]["text"]["size"] = 200
    (draft / "arx.json").write_text(json.dumps(meta))
    proc = _cli(capsys, "generate", exported_bundle("llama"), "--prompt-ids", "1,2,3",
                "--draft", draft)
    assert_one_line(proc, "vocabulary of 200 tokens, the target 160")


def test_profile_times_speculation_beside_plain(exported_bundle, perturbed_draft, tmp_path,
                                               capsys):
    """arx profile --draft: each shape gets acceptance, tokens per target step and the speed-up
    over its plain timing, in the JSON and the text report."""
    bundle, out = exported_bundle("llama"), tmp_path / "p.json"
    proc = _cli(capsys, "profile", bundle, "--draft", perturbed_draft("llama"), "--prompt-len",
                "8", "--batch", "1,2", "--gen-len", "24", "--runs", "1", "--warmup", "0",
                "--no-ops", "--no-roofline", "--quiet", "--json", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["options"]["draft"] == str(perturbed_draft("llama"))
    for r in report["bundles"][0]["results"]:
        s = r["speculation"]
        assert s["method"] == "draft" and 0 < s["acceptance_rate"] < 1
        assert s["tokens_per_target_step"] > 1 and s["speedup"] > 0
    assert proc.stdout.count("speculation (prompt 8") == 2


def test_profile_refuses_bad_speculation_flags(exported_bundle, capsys):
    bundle = exported_bundle("llama")
    assert_one_line(_cli(capsys, "profile", bundle, "--speculate", "2"), "needs a proposer")
    assert_one_line(_cli(capsys, "profile", bundle, "--lookup", "2", "--engine", "h100"),
                    "--engine does not time speculation yet")


def test_the_draft_session_never_spins(tiny_bundle):
    """The draft's idle threads sleep (they would take the cores from the target's verify
    steps); the target's other settings carry over."""
    from arx.runtime.backend import BackendOptions

    target = BackendOptions(device="cpu", intra_op_threads=2, spin_wait=True)
    with open_proposer(read_manifest(tiny_bundle), tiny_bundle, draft=tiny_bundle,
                       backend_options=target) as proposer:
        options = proposer.session.options
    assert options.spin_wait is False and options.intra_op_threads == 2
