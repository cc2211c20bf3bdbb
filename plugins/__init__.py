"""arx.plugins: kernels with three faces each (NumPy reference, Triton, TensorRT plugin).

Importing this package needs only NumPy: Triton loads with `arx.plugins.<op>.triton_kernel`,
TensorRT with `arx.plugins.tensorrt.register_plugins()`. See docs/plugins.md.
"""

from .attention.reference import AttentionOptions, kv_attention_reference
from .sampling.reference import SamplingParams, presence_mask, sample_reference

__all__ = ["AttentionOptions", "SamplingParams", "kv_attention_reference", "presence_mask",
           "sample_reference"]
