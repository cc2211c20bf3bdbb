"""TensorRT registrations: need the TensorRT libraries (skipped where only the bindings install)."""

import pytest

from arx.plugins._tensorrt import tensorrt_available

pytestmark = [pytest.mark.tensorrt,
              pytest.mark.skipif(not tensorrt_available(), reason="TensorRT libraries absent")]


def test_register_plugins_is_idempotent():
    from arx.plugins._tensorrt import require_trtp
    from arx.plugins.tensorrt import register_plugins

    ids = register_plugins(aot_target="sm_90a")
    assert ids == register_plugins(aot_target="sm_90a") == ("arx::kv_attention", "arx::sample")
    trtp = require_trtp()
    assert hasattr(trtp.op.arx, "kv_attention") and hasattr(trtp.op.arx, "sample")


@pytest.mark.gpu
def test_kv_attention_plugin_in_a_network(torch):
    """Build a one-node network with the plugin (JIT and AOT) and compare with the reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.skip("engine round trip is written by the arx build / TensorRT backend work")
