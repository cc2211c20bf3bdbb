"""Deployment targets: a table (data), never string matching on names.

Each row says which SM the plugin PTX is compiled for (a key of `arx.plugins.aot.TARGETS`),
which TensorRT releases an engine or kit for it needs, the JetPack floor on Jetson boards,
the memory the device has and the default maximum batch of its optimization profiles.

Version floors (see docs/tensorrt.md for the sources):
- TensorRT 11.0 is the first release where every network is strongly typed (arx puts precision
  in the graph) and its ONNX parser reads opset 23 (RMSNormalization) natively (max opset 25).
- TensorRT 11.4.1 is the first 11.x release for Jetson (JetPack 7.2.2 or later, Orin and Thor);
  Orin on JetPack 6.x stays on TensorRT 10.x, which arx does not target.
"""

from __future__ import annotations

from dataclasses import dataclass

from arx.errors import ArxError


@dataclass(frozen=True)
class Target:
    name: str
    sm: str  # PTX target, a key of arx.plugins.aot.TARGETS ("sm_90a")
    compute_capability: tuple[int, int]
    devices: str
    memory_gb: int
    max_batch: int  # default max batch of the optimization profiles
    trt_min: str  # oldest TensorRT the engine/kit is written for
    trt_max: str  # newest major line checked against ("11.x")
    jetpack_min: str | None = None  # Jetson only
    max_onnx_opset: int = 25  # newest ONNX opset its TensorRT parser reads
    # TensorRT's hardware compatibility (AMPERE_PLUS) exists for discrete GPUs only
    hardware_compat: bool = True

    @property
    def jetson(self) -> bool:
        return self.jetpack_min is not None

    def to_json(self) -> dict:
        return {"name": self.name, "sm": self.sm, "compute_capability": list(self.compute_capability),
                "devices": self.devices, "memory_gb": self.memory_gb, "max_batch": self.max_batch,
                "tensorrt_min": self.trt_min, "tensorrt_max": self.trt_max,
                "jetpack_min": self.jetpack_min, "max_onnx_opset": self.max_onnx_opset}


_T = Target
TARGETS: dict[str, Target] = {t.name: t for t in (
    _T("a100", "sm_80", (8, 0), "A100 40/80 GB, A30", 80, 64, "11.0", "11.x"),
    _T("orin", "sm_87", (8, 7), "Jetson AGX Orin, Orin NX, Orin Nano", 64, 8, "11.4.1", "11.x",
       jetpack_min="7.2.2", hardware_compat=False),
    _T("l4", "sm_89", (8, 9), "L4, L40S", 24, 32, "11.0", "11.x"),
    _T("rtx4090", "sm_89", (8, 9), "GeForce RTX 4090 / RTX 40xx", 24, 16, "11.0", "11.x"),
    _T("h100", "sm_90a", (9, 0), "H100 SXM/PCIe, GH200", 80, 64, "11.0", "11.x"),
    _T("h200", "sm_90a", (9, 0), "H200", 141, 128, "11.0", "11.x"),
    _T("thor", "sm_110a", (11, 0), "Jetson AGX Thor", 128, 16, "11.4.1", "11.x",
       jetpack_min="7.2.2", hardware_compat=False),
)}

# Other spellings people use for the same rows.
ALIASES = {"4090": "rtx4090", "l40s": "l4", "agx-orin": "orin", "jetson-orin": "orin",
           "jetson-thor": "thor", "gh200": "h100"}

# The SM whose PTX a hardware-compatible (--portable) engine carries: sm_80 PTX is JIT-compiled
# by the driver on every newer GPU, while arch-specific "a" PTX (sm_90a, sm_110a) is not.
PORTABLE_SM = "sm_80"


def get_target(name: str) -> Target:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TARGETS:
        raise ArxError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)} "
                       f"(see `arx build --list-targets`)")
    return TARGETS[key]


def targets_table() -> str:
    """The table as text, for `arx build --list-targets` and error details."""
    rows = [("target", "SM", "devices", "memory", "max batch", "TensorRT", "JetPack")]
    for t in TARGETS.values():
        rows.append((t.name, t.sm, t.devices, f"{t.memory_gb} GB", str(t.max_batch),
                     f">= {t.trt_min} ({t.trt_max})", f">= {t.jetpack_min}" if t.jetpack_min else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
