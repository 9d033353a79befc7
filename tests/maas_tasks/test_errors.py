"""maas_tasks.errors: the one-paragraph message a user sees, and the log that keeps the traceback."""

from __future__ import annotations

from maas_tasks.errors import append_traceback, one_paragraph


def test_one_paragraph_joins_lines_and_cuts_at_the_limit():
    assert one_paragraph("first line\n\n  second line  \n", 100) == "first line second line"
    cut = one_paragraph("x" * 50, 10)
    assert len(cut) == 10 and cut.endswith("…")


def test_append_traceback_keeps_every_failure_with_its_command(tmp_path):
    log = tmp_path / "logs" / "tool.log"
    for n in (1, 2):
        try:
            raise RuntimeError(f"failure {n}")
        except RuntimeError:
            assert append_traceback(log, f"tool run {n}") == log
    text = log.read_text()
    assert text.count("Traceback (most recent call last)") == 2
    assert text.index("tool run 1") < text.index("failure 1") < text.index("tool run 2") < text.index("failure 2")


def test_append_traceback_is_none_when_the_log_cannot_be_written(tmp_path):
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the log directory should be")
    try:
        raise ValueError("bad")
    except ValueError:
        assert append_traceback(blocker / "tool.log", "tool") is None
