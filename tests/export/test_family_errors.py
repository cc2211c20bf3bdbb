"""Export errors a user can reach are ArxErrors (one line, exit 2), not ValueErrors."""

from __future__ import annotations

import pytest
import torch

from arx.errors import ArxError


def test_model_without_rotary_embedding_says_what_to_do():
    from arx.export.hf_decoder import rope_cache

    with pytest.raises(ArxError, match="no rotary_emb module"):
        rope_cache(torch.nn.Linear(2, 2), None, 8)
