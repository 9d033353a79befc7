"""The benchmark result as a readable plain-text report: one section per comparison, tables of aligned
columns, every ratio beside the absolute figures it comes from."""

from __future__ import annotations

from typing import Any

from benchmarks.pipeline import DATA_STAGES, DATA_STAGES_TARGET_SECONDS
from benchmarks.scaling import NEAR_LINEAR_FACTOR, size_label
from benchmarks.serving import IN_PROCESS_ROWS, ROW_LABELS, best_in_process
from maas_tasks.train import ITERATIONS_PER_EPOCH

# The stages from a raw file to a trained model (the issue's "raw file → trained model" figure).
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


def _flag_mark(flag: str | None) -> str:
    return {"superlinear": " ^", "sublinear": " v"}.get(flag or "", "")


def _size_headers(runs: list[dict[str, Any]]) -> list[str]:
    return [size_label(r["rows"]) + (" synthetic" if r["synthetic"] else "") for r in runs]


def _line_through(fixed: float | None = None, per_1k: float | None = None) -> str:
    return "" if fixed is None or per_1k is None else f"; {fixed:.1f} s + {per_1k:.3f} s per 1k"


def format_scaling(scaling: dict[str, Any]) -> str:
    """Stages x sizes: seconds, seconds per 1k reviews and, from the second size on, the growth of the time
    against the size before (``^`` superlinear, ``v`` sublinear: the time per review changed by more than
    :data:`NEAR_LINEAR_FACTOR`); then the flags in words."""
    runs, summary = scaling["runs"], scaling["summary"]
    rows = []
    for stage, cells in summary["stages"].items():
        row = [stage]
        for cell in cells:
            if cell["seconds"] is None:
                row.append("n/a")
                continue
            growth = f"  x{cell['growth']:.2f}{_flag_mark(cell['flag'])}" if cell["growth"] is not None else ""
            row.append(f"{cell['seconds']:.2f} s  {cell['seconds_per_1k']:.3f}/1k{growth}")
        rows.append(row)
    growth = ", ".join(
        f"{size_label(a['rows'])} to {size_label(b['rows'])} x{b['rows'] / a['rows']:g}" for a, b in zip(runs, runs[1:])
    )
    lines = [
        f"scaling, raw file to served version (seconds, seconds per 1k reviews, time growth vs the previous size; "
        f"rows grew {growth or 'n/a'}; ^/v: time per review up/down more than {NEAR_LINEAR_FACTOR:g}x):",
        _table(["stage", *_size_headers(runs)], rows),
    ]
    flags = summary["flags"]
    lines.append(
        "not near-linear: " + "; ".join(
            f"{stage} {size_label(a)} to {size_label(b)} {flag} (time per review x{change:.2f}{_line_through(*line)})"
            for stage, a, b, flag, change, *line in flags
        ) if flags else "every stage near-linear between the sizes measured"
    )
    if flags:
        lines.append(
            "  (s + s per 1k: the line through both sizes; a sublinear stage has a fixed part that weighs less as "
            "the data grow, a superlinear one a negative part: each review costs more at the larger size)"
        )
    if any(run.get("vocab_size") for run in runs):
        cap = scaling.get("max_tokens")
        lines.append(
            "what train, export and serve carry grows with the vocabulary, not the rows: " + ", ".join(
                f"{size_label(run['rows'])} {run['vocab_size']:,} n-grams" + (" (the cap)" if run["vocab_size"] == cap else "")
                for run in runs if run.get("vocab_size")
            ) + (f" (max_tokens {cap:,})" if cap else "") + "; train's L-BFGS epochs kept: " + ", ".join(
                f"{size_label(run['rows'])} {run['train']['best_epoch']}" for run in runs if (run.get("train") or {}).get("best_epoch")
            ) + f" (each epoch is up to {ITERATIONS_PER_EPOCH} passes over the rows; a fit that converges sooner costs fewer)"
        )
    lines.append(f"not in the stages: importing TensorFlow, Keras and Great Expectations, {scaling['import_seconds']:.1f} s "
                 "once per process (an Airflow task pays it once per task)")
    lines += [f"note: {note}" for note in scaling.get("notes") or []]
    return "\n".join(lines)


def format_memory(scaling: dict[str, Any]) -> str:
    """Stages x sizes: each stage's own peak RSS (this process and its children) and its rise over the
    stage's start, in MiB."""
    runs = scaling["runs"]
    names = list(dict.fromkeys(s["stage"] for r in runs for s in r["stages"]))
    rows = []
    for name in names:
        row = [name]
        for run in runs:
            stage = next((s for s in run["stages"] if s["stage"] == name), None)
            row.append("n/a" if stage is None else f"{stage['peak_mb']:,.0f} (+{stage['delta_mb']:,.0f})")
        rows.append(row)
    return ("peak memory per stage, MiB (RSS of the process and its children sampled every 20 ms during the stage; "
            "in brackets: the rise over the stage's start):\n" + _table(["stage", *_size_headers(runs)], rows))


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def format_featurisation(featurisation: dict[str, Any]) -> str:
    """Project vs scikit-learn: fit, transform and both, seconds and documents per second, the ratio
    (project docs/s over scikit-learn's) and the goal's verdict."""
    project, sklearn, ratios = featurisation["project"], featurisation["sklearn"], featurisation["ratios"]
    rows = []
    for part in ("fit", "transform"):
        p, k = project[part], sklearn[part]
        rows.append([part, f"{p['seconds']:.2f}", _rate(p["docs_per_s"]), f"{p['peak_mb']:,.0f} (+{p['delta_mb']:,.0f})",
                     f"{k['seconds']:.2f}", _rate(k["docs_per_s"]), f"{k['peak_mb']:,.0f} (+{k['delta_mb']:,.0f})",
                     _number(ratios[part], 2)])
    both = [project["fit"]["seconds"] + project["transform"]["seconds"], sklearn["fit"]["seconds"] + sklearn["transform"]["seconds"]]
    n = featurisation["texts"]
    rows.append(["fit + transform", f"{both[0]:.2f}", _rate(n / both[0]), "", f"{both[1]:.2f}", _rate(n / both[1]), "",
                 _number(ratios["fit_transform"], 2)])
    settings = featurisation["settings"]
    verdict = {True: "PASS", False: "FAIL", None: "n/a"}[featurisation["no_slower"]]
    return "\n".join([
        f"featurisation on {n:,} train texts: the project's (fit_vectorizer + lookup table, then the model's "
        f"features) vs scikit-learn TfidfVectorizer(ngram_range=({settings['ngram_range'][0]}, "
        f"{settings['ngram_range'][1]}), min_df={settings['min_df']}, max_features={settings['max_features']:,}):",
        _table(["", "project s", "docs/s", "peak MiB", "sklearn s", "docs/s", "peak MiB", "ratio"], rows),
        f"vocabulary {project['vocab_size']:,} vs {sklearn['vocab_size']:,}; non-zeros {project['nonzeros']:,} vs "
        f"{sklearn['nonzeros']:,}; project lookup-table build {project['fit']['lookup_seconds']:.2f} s of its fit",
        f"goal: no slower than scikit-learn (ratio >= 1 for fit and for transform): {verdict}",
    ])


def format_quality(quality: dict[str, Any]) -> str:
    """Project vs scikit-learn on the same held-out rows: accuracy, F1, ROC AUC, log loss, the difference."""
    project, sklearn = quality["project"], quality["sklearn"]
    rows = []
    for key, name in (("accuracy", "accuracy"), ("f1", "f1"), ("roc_auc", "roc_auc"), ("log_loss", "log_loss")):
        a, b = project.get(key), sklearn.get(key)
        rows.append([name, _number(a), _number(b), "n/a" if a is None or b is None else f"{a - b:+.4f}"])
    split = quality["rows"]
    chosen = (f"C={sklearn['c']:g} chosen on the {split['validation']:,} validation rows" if sklearn["c_selection"]
              else f"C={sklearn['c']:g}, training's default: too few validation rows to choose")
    return (
        f"model quality on the same split (both fit on the {split['train']:,} train-side rows, scored on the "
        f"{split['eval']:,} test rows): project vs scikit-learn TF-IDF + LogisticRegression ({chosen}):\n"
        + _table(["metric", "project", "sklearn", "difference"], rows)
    )


def format_report(result: dict[str, Any]) -> str:
    """Render :func:`benchmarks.__main__.run_benchmark`'s result (with its run context): scaling, memory,
    featurisation, quality, the main run's model and data figures, serving."""
    pipeline = result["pipeline"]
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
    machine, code = result.get("machine") or {}, result.get("code") or {}
    main_label = size_label(result["scaling"]["main_size"])
    return "\n\n".join(
        [
            f"MaaS benchmark{' (quick)' if result.get('quick') else ''}: {result['data']} ({result['data_rows']:,} rows), "
            f"{result['seconds']:.0f} s in all; {machine.get('cpus')} cores, {machine.get('memory_gib')} GiB, Python "
            f"{machine.get('python')}; commit {str(code.get('commit'))[:12]}{' (dirty)' if code.get('dirty') else ''}",
            format_scaling(result["scaling"]),
            format_memory(result["scaling"]),
            format_featurisation(result["featurisation"]),
            format_quality(result["quality"]),
            f"the {main_label} run's model ({rows['train']} train / {rows['eval']} eval rows, device "
            f"{pipeline['train']['device']}):\n" + _table(["eval metric", "value"], quality_rows),
            *sections,
            _load_heading(serving["load"]) + ":\n" + format_load_table(serving["load"]),
            "serving targets (2-core machine):\n" + format_targets(serving["load"]["targets"]),
        ]
    )
