"""The benchmark result as a readable plain-text report."""

from __future__ import annotations

from typing import Any

from benchmarks.pipeline import DATA_STAGES, DATA_STAGES_TARGET_SECONDS
from benchmarks.serving import IN_PROCESS_ROWS, ROW_LABELS, best_in_process

# The stages from a raw file to a trained model (the "raw file → trained model" figure).
TO_TRAINED_STAGES = ("ingest", "validate", "clean", "features", "train")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
              for row in rows]
    return "\n".join(lines)


def _number(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_load_table(load: dict[str, Any]) -> str:
    """The load comparison: one line per row and cell, the rows of a cell together, blank lines between cells.

    ``vs best`` is the row's texts/s over the faster in-process row's in the same cell; ``client CPU`` is
    what the load generator's process used, in percent of one core (the machine has ``os.cpu_count()``).
    """
    rows = load["rows"]
    cells = sorted({(c["batch_size"], c["clients"]) for cells in rows.values() for c in cells})
    lines = []
    for batch_size, clients in cells:
        if lines:
            lines.append([""] * 11)
        best = best_in_process(rows, batch_size, clients)
        for name, results in rows.items():
            cell = next((c for c in results if (c["batch_size"], c["clients"]) == (batch_size, clients)), None)
            if cell is None:
                continue
            share = f"{cell['texts_per_s'] / best[1]['texts_per_s']:.0%}" if best and best[1]["texts_per_s"] else "n/a"
            lines.append([
                ROW_LABELS.get(name, name), str(batch_size), str(clients), str(cell["requests"]), str(cell["errors"]),
                f"{cell['requests_per_s']:.0f}", f"{cell['texts_per_s']:.0f}", share, _ms(cell["p50_ms"]), _ms(cell["p99_ms"]),
                "" if name in IN_PROCESS_ROWS else f"{cell['client_cpu_percent']:.0f}%",
            ])
    headers = ["server", "texts/req", "clients", "requests", "errors", "req/s", "texts/s", "vs best", "p50 ms", "p99 ms",
               "client CPU"]
    table = _table(headers, lines)
    failures = [
        f"  {ROW_LABELS.get(name, name)}, {c['batch_size']} texts x {c['clients']} clients: "
        + ", ".join(f"{kind} x {n}" for kind, n in c["error_kinds"].items())
        for name, results in rows.items() for c in results if c["errors"]
    ]
    return table + ("\nfailed requests:\n" + "\n".join(failures) if failures else "")


def format_targets(targets: list[dict[str, Any]]) -> str:
    """One line per target: PASS, FAIL or n/a (not measured), what it requires, and the figures."""
    verdicts = {True: "PASS", False: "FAIL", None: "n/a "}
    return "\n".join(f"  {verdicts[t['passed']]}  {t['target']}: {t['measured']}" for t in targets)


def _load_heading(load: dict[str, Any]) -> str:
    settings, ready = load["settings"], load["ready_seconds"]
    if load["batching"]:
        parameters = ", ".join(
            line.strip() for line in load["batching_parameters"].splitlines() if line.strip() and not line.startswith("#")
        )
        batching = f"with --enable_batching ({parameters})"
    else:
        batching = "WITHOUT server-side batching (it does not accept --enable_batching yet)"
    return (
        f"serving under load: {settings['seconds']:g} s counted per cell after {settings['warmup_seconds']:g} s of "
        f"warm-up, closed-loop clients in their own process; model server {batching}, ready in "
        f"{ready['model_server']:.1f} s (Flask {ready['flask']:.1f} s); {load['seconds']:.0f} s in all"
    )


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
    rows = pipeline["rows"]
    to_trained = sum(s["seconds"] for s in pipeline["stages"] if s["stage"] in TO_TRAINED_STAGES)
    sections = []
    data_seconds = sum(s["seconds"] for s in pipeline["stages"] if s["stage"] in DATA_STAGES)
    if data_seconds:
        data = pipeline.get("data") or {}
        splits = ", ".join(f"{name} {n}" for name, n in (data.get("splits") or {}).items())
        verdict = "PASS" if data_seconds < DATA_STAGES_TARGET_SECONDS else "FAIL"
        sections.append(
            f"data stages ({' + '.join(DATA_STAGES)}, the split included): {data_seconds:.1f} s, target < "
            f"{DATA_STAGES_TARGET_SECONDS:g} s: {verdict}; {data.get('quarantined', 0)} rows quarantined"
            + (f"; splits {splits}" if splits else "")
        )
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
            _load_heading(serving["load"]) + ":\n" + format_load_table(serving["load"]),
            "serving targets (2-core machine):\n" + format_targets(serving["load"]["targets"]),
            *sections,
        ]
    )
