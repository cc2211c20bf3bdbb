"""w8a8 on CPUs whose onnxruntime int8 MatMul saturates (x86 without VNNI): the probe, --reduce-range
(7-bit weights) and the runtime's warning for a bundle with 8-bit weights there."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import onnx
import pytest
from bench_scripts import import_script
from onnx import numpy_helper

from arx.calibration.calibrator import calibrate_bundle, with_reduce_range
from arx.calibration.options import CalibrateOptions, DataOptions, QuantOptions
from arx.errors import ArxError
from arx.manifest import read_manifest
from arx.runtime import int8_kernel

NO_SATURATION_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def _calibrate(bundle: Path, text: Path, out: Path, reduce_range: str) -> Path:
    quant = QuantOptions(scheme="w8a8", reduce_range=reduce_range)
    data = DataOptions(path=str(text), samples=8, seq_len=32, eval_samples=4)
    calibrate_bundle(bundle=bundle, output=out, options=CalibrateOptions(
        quant=quant, data=data, progress=False, plot=False, force=True))
    return out


@pytest.fixture(scope="module")
def calibrated(llama_bundle, calib_text, tmp_path_factory):
    made = {}

    def get(reduce_range: str) -> Path:
        if reduce_range not in made:
            out = tmp_path_factory.mktemp(f"rr-{reduce_range}") / "q.arx"
            made[reduce_range] = _calibrate(llama_bundle, calib_text, out, reduce_range)
        return made[reduce_range]

    return get


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"),
                    reason="the CPU-flag rule is checked where /proc/cpuinfo lists x86 flags")
def test_probe_agrees_with_the_cpu_flags():
    """MLAS's AVX2 / AVX-512BW u8 x s8 kernels saturate; the VNNI and AMX ones do not."""
    int8_kernel.int8_matmul_saturates.cache_clear()
    expected = not (_cpu_flags() & set(NO_SATURATION_FLAGS))
    assert int8_kernel.int8_matmul_saturates() is expected


def test_reduce_range_keeps_weights_in_7_bits_and_the_kernel_exact(calibrated):
    """On any host, the int8 kernels of a --reduce-range on bundle compute what its Q/DQ graph
    says: ORT's fused int8 path equals the unfused graph (DequantizeLinear + float MatMul)."""
    out = calibrated("on")
    ext = read_manifest(out).extensions["quantization"]
    assert ext["reduce_range"] is True
    model = onnx.load(str(out / "decoder.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    weights = [numpy_helper.to_array(inits[n.input[0]]) for n in model.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64
    kernel_error = import_script("int8_kernel_error")  # benchmarks/: the same measurement
    fused, unfused = (kernel_error.prefill_logits(out, f) for f in (True, False))
    assert np.abs(fused - unfused).max() <= 1e-3 * np.abs(unfused).max()


def test_auto_follows_the_host(monkeypatch):
    w8a8 = CalibrateOptions(quant=QuantOptions(scheme="w8a8"))
    for saturates, expected in ((True, "on"), (False, "off")):
        monkeypatch.setattr(int8_kernel, "int8_matmul_saturates", lambda s=saturates: s)
        assert with_reduce_range(w8a8).quant.reduce_range == expected
    for asked in ("on", "off"):  # an explicit choice is kept
        opts = CalibrateOptions(quant=QuantOptions(scheme="w8a8", reduce_range=asked))
        assert with_reduce_range(opts).quant.reduce_range == asked
    w4 = CalibrateOptions(quant=QuantOptions(scheme="w4", group_size=32))
    assert with_reduce_range(w4).quant.reduce_range == "off"  # its kernel does not saturate


def test_bad_choices_are_refused_in_one_line():
    with pytest.raises(ArxError, match="--reduce-range must be one of auto, on, off"):
        QuantOptions(reduce_range="7bit")
    with pytest.raises(ArxError, match="does not need it"):
        QuantOptions(scheme="w4", group_size=32, reduce_range="on")


def test_8bit_bundle_warns_where_the_kernel_saturates(calibrated, monkeypatch, capsys):
    from arx.runtime.decoder import DecoderSession

    full, reduced = calibrated("off"), calibrated("on")
    capsys.readouterr()  # what calibrating them printed
    assert read_manifest(full).extensions["quantization"]["reduce_range"] is False
    monkeypatch.setattr(int8_kernel, "int8_matmul_saturates", lambda: True)
    int8_kernel._warn_once.cache_clear()
    with DecoderSession(reduced):
        pass
    assert "saturates" not in capsys.readouterr().err
    with DecoderSession(full):
        pass
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--reduce-range on" in err[0] and err[0].startswith("arx: warning:")
    assert int8_kernel.saturation_warning(read_manifest(full), device="cuda") is None
    monkeypatch.setattr(int8_kernel, "int8_matmul_saturates", lambda: False)
    assert int8_kernel.saturation_warning(read_manifest(full)) is None
