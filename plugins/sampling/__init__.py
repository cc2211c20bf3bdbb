"""Token sampling on the device (`arx::sample`): spec, reference, kernels."""

from .reference import (PARAM_COLUMNS, SamplingParams, philox_uniform, presence_mask,
                        sample_reference)

__all__ = ["PARAM_COLUMNS", "SamplingParams", "philox_uniform", "presence_mask",
           "sample_reference"]
