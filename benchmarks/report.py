"""The benchmark result as a readable plain-text report."""

from __future__ import annotations

from typing import Any


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              for row in rows]
    return "\n".join(lines)


def _number(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_report(result: dict[str, Any]) -> str:
    """Render :func:`benchmarks.__main__.run_benchmark`'s result: stages, model quality, serving."""
    pipeline = result["pipeline"]
    stage_rows = [[s["stage"], f"{s['seconds']:.2f}", f"{s['peak_rss_mb']:.0f}"] for s in pipeline["stages"]]
    stage_rows.append(["total", f"{sum(s['seconds'] for s in pipeline['stages']):.2f}", ""])
    m = pipeline["metrics"]
    quality_rows = [
        ["accuracy", _number(m["accuracy"])],
        ["f1", _number(m["f1"])],
        ["roc_auc", _number(m["roc_auc"])],
        ["log_loss", _number(m["log_loss"])],
        ["ece (10 bins)", _number(m["ece"])],
        ["mean max-probability", _number(m["mean_confidence"])],
        ["scores rounding to 1.0000", f"{m['saturated']:.2%}"],
        ["temperature", _number(pipeline["train"]["temperature"], 3)],
    ]
    serving = result["serving"]
    serving_rows = [
        [
            f"{api} {name}",
            str(s["requests"]),
            f"{s['p50_ms']:.2f}",
            f"{s['p95_ms']:.2f}",
            f"{s['p99_ms']:.2f}",
            f"{s['requests_per_s']:.1f}",
            f"{s['texts_per_s']:.0f}",
        ]
        for api in ("rest", "grpc")
        for name, s in serving[api].items()
    ]
    rows = pipeline["rows"]
    return "\n\n".join(
        [
            f"MaaS benchmark: {result['data']} ({rows['train']} train / {rows['eval']} eval rows, "
            f"device {pipeline['train']['device']}, {result['seconds']:.0f} s in all)",
            _table(["stage", "seconds", "peak RSS MiB"], stage_rows),
            _table(["eval metric", "value"], quality_rows),
            f"serving (model loaded in {serving['load_seconds']:.2f} s; one client, sequential, loopback):\n"
            + _table(["api / request", "requests", "p50 ms", "p95 ms", "p99 ms", "req/s", "texts/s"], serving_rows),
        ]
    )
