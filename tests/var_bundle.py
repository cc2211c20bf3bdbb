"""The VAR-shaped module of tests/var_model.py exported once per test module: 10 classes, a
64-entry codebook over 8 channels, scales 1, 2, 3, 4, 6, gray pixels 12x12."""

from __future__ import annotations

import torch

from arx.export.exporter import ExportOptions, export_model
from var_model import tiny_var


def export_var_bundle(folder, **kwargs):
    """(module, bundle path): the module saved as model.pt in `folder`, then arx export."""
    module = tiny_var(**kwargs)
    with torch.no_grad():  # sharper logits than the init's, so sampling and CFG matter
        module.head.weight.mul_(8.0)
    torch.save(module, folder / "model.pt")
    export_model(source=folder / "model.pt", output=folder / "var.arx",
                 options=ExportOptions(progress=False))
    return module, folder / "var.arx"
