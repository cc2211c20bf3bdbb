"""The accuracy report: a printed table, `reports/accuracy.json` and `reports/accuracy.png`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from arx.calibration.evaluate import LayerError, ModelMetrics
from arx.errors import require

REPORT_DIR = "reports"
JSON_NAME = "accuracy.json"
PLOT_NAME = "accuracy.png"
LAYER_METHOD = ("relative L2 error of each quantized MatMul's input and output vs the fp32 "
                "(SmoothQuant-folded) graph on held-out prefills; added = out - in")


def percent(fraction: float) -> str:
    """A gate with the precision it was given: 0.02 -> 2%, 0.005 -> 0.5% (`:.0%` printed 0%)."""
    return f"{fraction * 100:.6g}%"  # 6 digits hide float noise (0.1 * 100 = 10.000000000000002)


@dataclass
class AccuracyReport:
    scheme: str
    metrics: ModelMetrics
    layers: list[LayerError]  # worst first
    gate: float  # allowed perplexity increase (fraction)
    data: dict
    settings: dict
    kv: ModelMetrics | None = None  # --kv-dtype: the fp32-weight bundle with only its cache changed

    @property
    def passed(self) -> bool:
        return self.metrics.ppl_increase <= self.gate

    def worst(self, n: int) -> list[LayerError]:
        return self.layers[:n]

    def to_json(self, n_layers: int) -> dict:
        m = self.metrics
        return {
            "scheme": self.scheme,
            "perplexity": {"fp32": m.ppl_fp32, "quantized": m.ppl_quant, "increase": m.ppl_increase},
            "top1_agreement": m.top1_agreement,
            "kl_mean": m.kl_mean,
            "tokens": m.tokens,
            "gate": {"max_ppl_increase": self.gate, "passed": self.passed},
            "worst_layers": [{"name": e.name, "rel_err_in": e.err_in, "rel_err_out": e.err_out,
                              "added": e.added} for e in self.worst(n_layers)],
            "all_layers": [{"name": e.name, "rel_err_in": e.err_in, "rel_err_out": e.err_out}
                           for e in self.layers],
            "layer_error_method": self.settings.get("per_layer") or LAYER_METHOD,  # export: skipped
            "data": self.data,
            "settings": self.settings,
            **({"kv_cache_only": _kv_json(self.kv, self.settings.get("kv_dtype"))} if self.kv else {}),
        }


def _kv_json(m: ModelMetrics, dtype: str) -> dict:
    return {"kv_dtype": dtype, "weights": "fp32", "perplexity": {
        "fp32": m.ppl_fp32, "quantized": m.ppl_quant, "increase": m.ppl_increase},
        "top1_agreement": m.top1_agreement, "kl_mean": m.kl_mean, "tokens": m.tokens}


def table(report: AccuracyReport, n_layers: int) -> str:
    m = report.metrics
    verdict = "pass" if report.passed else "FAIL"
    lines = [
        f"accuracy of {report.scheme} vs fp32 on {m.tokens} held-out {_data_words(report.data)}",
        f"  {'':<22}{'fp32':>10}{report.scheme:>10}",
        f"  {'perplexity':<22}{m.ppl_fp32:>10.3f}{m.ppl_quant:>10.3f}   "
        f"{m.ppl_increase:+.2%} (gate {percent(report.gate)}: {verdict})",
        f"  {'top-1 agreement':<22}{'':>10}{m.top1_agreement:>10.2%}",
        f"  {'mean KL(fp32||quant)':<22}{'':>10}{m.kl_mean:>10.4f}",
    ]
    if report.kv is not None:  # the gate above is weights + cache; this line the cache alone
        k = report.kv
        lines.append(f"  {report.settings.get('kv_dtype')} KV cache alone (fp32 weights): perplexity "
                     f"{k.ppl_increase:+.3%}, top-1 {k.top1_agreement:.2%}, KL {k.kl_mean:.2g}")
    if report.layers:
        lines.append("  worst layers (relative error of the output; added by the layer):")
        for e in report.worst(n_layers):
            lines.append(f"    {e.name:<32} {e.err_out:>8.2%}  (+{max(e.added, 0):.2%})")
    return "\n".join(lines)


def _data_words(data: dict) -> str:
    if data.get("kind") == "drawn":  # a next-scale bundle's own images (calibration/next_scale.py)
        return (f"image tokens ({data.get('eval_images')} images the fp32 bundle drew, "
                f"cfg {data.get('cfg'):g}, teacher-forced)")
    return "tokens" + (" (RANDOM TOKENS)" if data.get("kind") != "text" else "")


def write(report: AccuracyReport, bundle: Path, n_layers: int, *, plot: bool) -> dict[str, str]:
    """Write the JSON (and the PNG when asked); return {kind: path relative to the bundle}."""
    out = Path(bundle) / REPORT_DIR
    out.mkdir(exist_ok=True)
    (out / JSON_NAME).write_text(json.dumps(report.to_json(n_layers), indent=2) + "\n", encoding="utf-8")
    files = {"json": f"{REPORT_DIR}/{JSON_NAME}"}
    if plot:
        _plot(report, out / PLOT_NAME)
        files["plot"] = f"{REPORT_DIR}/{PLOT_NAME}"
    return files


def _plot(report: AccuracyReport, path: Path) -> None:
    """Left: perplexity fp32 vs quantized with the gate line. Right: error per linear, in graph order."""
    require("matplotlib", "plot", "the accuracy plot")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    m = report.metrics
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 3]})
    # The increase, not the raw perplexities: two bars of ~equal height say nothing at a glance.
    inc = m.ppl_increase * 100
    bars = ax1.bar([f"{report.scheme} vs fp32"], [inc], color="#55a868" if report.passed else "#c44e52")
    ax1.axhline(report.gate * 100, color="gray", ls="--", lw=1, label=f"gate {percent(report.gate)}")
    ax1.axhline(0, color="black", lw=0.8)
    ax1.bar_label(bars, fmt="%+.2f%%")
    ax1.set_ylim(min(0.0, inc) * 1.3 - 0.1, max(report.gate * 100, inc) * 1.3)
    ax1.set_ylabel("perplexity increase (%)")
    ax1.set_title(f"ppl {m.ppl_fp32:.2f} -> {m.ppl_quant:.2f}\ntop-1 {m.top1_agreement:.1%}, "
                  f"KL {m.kl_mean:.4f}", fontsize=10)
    ax1.legend(loc="upper left", fontsize=8)
    order = report.settings.get("linear_order") or [e.name for e in report.layers]
    by_name = {e.name: e for e in report.layers}
    names = [n for n in order if n in by_name]
    worst = {e.name for e in report.worst(5)}
    ax2.bar(range(len(names)), [by_name[n].err_out * 100 for n in names],
            color=["#c44e52" if n in worst else "#8c8c8c" for n in names])
    ax2.set_xticks(range(len(names)), names, rotation=90, fontsize=6 if len(names) > 30 else 8)
    ax2.set_ylabel("relative error of output (%)")
    ax2.set_title("per quantized MatMul (red: largest added error)", fontsize=10)
    fig.suptitle(f"arx calibrate: {report.scheme} accuracy vs fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
