"""The benchmark result as a readable plain-text report."""

from __future__ import annotations

from typing import Any

# The stages from a raw file to a trained model (the "raw file → trained model" figure).
TO_TRAINED_STAGES = ("ingest", "validate", "clean", "features", "train")


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
    to_trained = sum(s["seconds"] for s in pipeline["stages"] if s["stage"] in TO_TRAINED_STAGES)
    sections = []
    if pipeline.get("vocab_size"):
        sections.append(
            f"raw file to trained model (ingest to train): {to_trained:.1f} s; vocabulary {pipeline['vocab_size']:,} "
            f"n-grams; kept epoch {pipeline['train'].get('best_epoch')}"
        )
    probe = pipeline.get("short_probe")
    if probe:
        sections.append(
            f"calibration by length: first {probe['words']} words of each text ECE {probe['ece']:.4f}; "
            + ", ".join(f"{name} ECE {part['ece']:.4f} ({part['n']} rows)" for name, part in (pipeline.get("slices") or {}).items())
        )
    memory = serving.get("memory")
    if memory:
        dense_mb = memory["batch_size"] * (pipeline.get("vocab_size") or 0) * 4 / 2**20
        sections.append(
            f"serving memory (own process, REST batches of {memory['batch_size']} of the longest reviews, "
            f"{memory['words_per_text']:.0f} words each on average): RSS {memory['loaded']['rss_mb']:.0f} MiB loaded, "
            f"peak {memory['after_batches']['peak_rss_mb']:.0f} MiB (+{memory['batch_peak_increase_mb']:.0f} MiB); "
            f"{memory['batch_seconds'] * 1000:.0f} ms per batch"
            + (f"; a dense [batch, vocabulary] float32 tensor alone would be {dense_mb:,.0f} MiB" if dense_mb else "")
        )
    return "\n\n".join(
        [
            f"MaaS benchmark: {result['data']} ({rows['train']} train / {rows['eval']} eval rows, "
            f"device {pipeline['train']['device']}, {result['seconds']:.0f} s in all)",
            _table(["stage", "seconds", "peak RSS MiB"], stage_rows),
            _table(["eval metric", "value"], quality_rows),
            f"serving (model loaded in {serving['load_seconds']:.2f} s; one client, sequential, loopback):\n"
            + _table(["api / request", "requests", "p50 ms", "p95 ms", "p99 ms", "req/s", "texts/s"], serving_rows),
            *sections,
        ]
    )
