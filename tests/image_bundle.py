"""A LlamaGen-shaped class-to-image module (arx.export.image_modules) exported once per test
module: 5 classes, a 48-entry codebook, a 4x4 grid, RGB pixels 8x8."""

from __future__ import annotations

import torch

from arx.export.exporter import ExportOptions, export_model
from arx.export.image_modules import ClassToImageDecoder, VQDecoder

CLASSES, CODEBOOK, GRID = 5, 48, 4


def export_c2i(folder, cfg_scale: float = 4.0):
    """(module, bundle path): the module saved as model.pt in `folder`, then arx export."""
    torch.manual_seed(0)
    module = ClassToImageDecoder(num_classes=CLASSES, codebook=CODEBOOK, grid=GRID,
                                 vq=VQDecoder(CODEBOOK, GRID, upsamples=1),
                                 cfg_scale=cfg_scale).eval()
    with torch.no_grad():  # sharper logits than the init's, so sampling and CFG matter
        module.output.weight.mul_(8.0)
    torch.save(module, folder / "model.pt")
    export_model(source=folder / "model.pt", output=folder / "c2i.arx",
                 options=ExportOptions(progress=False))
    return module, folder / "c2i.arx"


def export_shared_vocab_c2i(folder, text: int, codebook: int, grid: int, classes: int = 3):
    """(module, bundle) of a module whose logits span a text vocabulary then the codebook
    (`arx_image["codebook"] = [text, codebook]`), text columns louder than image ones, so an
    argmax over the whole row would pick text ids."""
    torch.manual_seed(0)
    module = ClassToImageDecoder(num_classes=classes, codebook=codebook, grid=grid,
                                 text_vocab=text, vq=VQDecoder(codebook, grid, upsamples=1)).eval()
    with torch.no_grad():
        module.output.weight.mul_(8.0)
        module.output.weight[:text] *= 4.0
    torch.save(module, folder / "model.pt")
    export_model(source=folder / "model.pt", output=folder / "c2i.arx",
                 options=ExportOptions(progress=False))
    return module, folder / "c2i.arx"
