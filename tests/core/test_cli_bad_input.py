"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from arx.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_clean_failure(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("arx: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers


def test_missing_path(tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", str(tmp_path / "nope"), "-o", str(tmp_path / "o.arx"))
    assert_clean_failure(code, err, "does not exist")
    assert_nothing_written(tmp_path / "o.arx")


def test_file_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("just some text, not a pickle\n")
    code, _, err = run_cli(capsys, "export", str(tmp_path / "notes.pt"), "-o", str(tmp_path / "o.arx"))
    assert_clean_failure(code, err, "not a readable torch.save file")
    assert_nothing_written(tmp_path / "o.arx")


def test_corrupt_pickle(tmp_path, capsys):
    (tmp_path / "model.pt").write_bytes(b"\x80\x04\x95" + bytes(range(200)))
    code, _, err = run_cli(capsys, "export", str(tmp_path / "model.pt"), "-o", str(tmp_path / "o.arx"))
    assert_clean_failure(code, err, "model.pt")
    assert_nothing_written(tmp_path / "o.arx")


def test_state_dict_instead_of_module(tmp_path, capsys):
    import torch

    torch.save({"w": torch.zeros(2)}, tmp_path / "sd.pt")
    code, _, err = run_cli(capsys, "export", str(tmp_path / "sd.pt"), "-o", str(tmp_path / "o.arx"))
    assert_clean_failure(code, err, "state dict")


def test_corrupt_safetensors(tmp_path, capsys, hf_model_dir):
    src, _ = hf_model_dir("llama")
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    code, _, err = run_cli(capsys, "export", str(broken), "-o", str(tmp_path / "o.arx"))
    assert_clean_failure(code, err, "corrupt")
    assert_nothing_written(tmp_path / "o.arx")


def test_unsupported_architecture_lists_supported(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    code, _, err = run_cli(capsys, "export", str(tmp_path), "-o", str(tmp_path.parent / "b.arx"))
    assert_clean_failure(code, err, "unsupported architecture 'bert'", "llama", "gpt2", "qwen3", "phi3")


def test_folder_without_config(tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", str(tmp_path), "-o", str(tmp_path.parent / "c.arx"))
    assert_clean_failure(code, err, "config.json")


def test_unwritable_output_folder(tmp_path, capsys, hf_model_dir):
    src, _ = hf_model_dir("llama")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    code, _, err = run_cli(capsys, "export", str(src), "-o", str(blocker / "out.arx"))
    assert_clean_failure(code, err, "does not exist")
    code, _, err = run_cli(capsys, "export", str(src), "-o", "/proc/arx-test.arx")
    assert_clean_failure(code, err, "/proc")
    assert not Path("/proc/arx-test.arx").exists()


def test_existing_output_needs_overwrite(tmp_path, capsys, hf_model_dir):
    src, _ = hf_model_dir("llama")
    (tmp_path / "o.arx").mkdir()
    code, _, err = run_cli(capsys, "export", str(src), "-o", str(tmp_path / "o.arx"))
    assert_clean_failure(code, err, "--overwrite")


def test_parity_failure_prints_table_and_writes_nothing(tmp_path, capsys, hf_model_dir):
    src, _ = hf_model_dir("gpt2")
    out = tmp_path / "o.arx"
    code, _, err = run_cli(capsys, "export", str(src), "-o", str(out), "--atol", "1e-12", "-q")
    assert_clean_failure(code, err, "parity check failed", "--atol")
    assert "max abs" in err and "logits/" in err  # the table of the worst outputs
    assert_nothing_written(out)


@pytest.fixture(scope="module")
def short_bundle(tmp_path_factory):
    from arx.export.exporter import ExportOptions, export_model
    from tiny_models import make_hf_model

    folder = tmp_path_factory.mktemp("short")
    make_hf_model("llama", folder / "hf")
    out = folder / "short.arx"
    export_model(source=folder / "hf", output=out, options=ExportOptions(max_seq_len=32, progress=False))
    return out


def test_prompt_longer_than_context(short_bundle, capsys):
    ids = ",".join(["5"] * 40)
    code, _, err = run_cli(capsys, "generate", str(short_bundle), "--prompt-ids", ids)
    assert_clean_failure(code, err, "exceeds the bundle's context of 32")


def test_explicit_new_tokens_past_the_context(short_bundle, capsys):
    """A number the user asked for is not cut short silently: the error offers the clean stop."""
    code, _, err = run_cli(capsys, "generate", str(short_bundle), "--prompt-ids", "1,2",
                           "--max-new-tokens", "31")
    assert_clean_failure(code, err, "2 tokens + 31 new tokens exceeds the bundle's context of 32",
                         "--max-new-tokens context")


def test_generate_on_an_engine_that_was_not_built(short_bundle, capsys):
    code, _, err = run_cli(capsys, "generate", str(short_bundle), "--prompt-ids", "1,2",
                           "--engine", "h100")
    assert_clean_failure(code, err, "no engine for h100", "arx build")


@pytest.mark.parametrize("flags, fragment", [
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "lots"], "a number or 'context'"),
    (["--seed", "-3"], "--seed"),
    (["--greedy", "--sample"], "contradict"),
    (["--threads", "-1"], "--threads"),
])
def test_invalid_sampling_values(short_bundle, capsys, flags, fragment):
    code, _, err = run_cli(capsys, "generate", str(short_bundle), "--prompt-ids", "1,2", *flags)
    assert_clean_failure(code, err, fragment)


@pytest.mark.parametrize("args, fragment", [
    (["--prompt-ids", "1,x"], "comma-separated integers"),
    (["--prompt-ids", "1,99999"], "outside the vocabulary"),
    (["--prompt", "hello"], "no tokenizer"),
])
def test_bad_prompts(short_bundle, capsys, args, fragment):
    code, _, err = run_cli(capsys, "generate", str(short_bundle), *args)
    assert_clean_failure(code, err, fragment)


def test_missing_or_broken_bundle(tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", str(tmp_path / "none.arx"), "--prompt-ids", "1")
    assert_clean_failure(code, err, "does not exist")
    (tmp_path / "b.arx").mkdir()
    (tmp_path / "b.arx" / "arx.json").write_text("{not json")
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "b.arx"))
    assert_clean_failure(code, err, "corrupt")


def test_real_process_exit_code_and_single_line(tmp_path):
    """The console entry point, as a user runs it: exit status 2 and one line on stderr."""
    proc = subprocess.run([sys.executable, "-m", "arx", "export", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("arx: error:")
