"""Progress in a log (not a terminal): timed plain lines, a final line, silence when quiet."""

from __future__ import annotations

import io

import pytest

from mrisegcli.progress import LineProgress, StageProgress, task_progress


def test_line_progress_prints_rate_limited_lines_and_a_final_one() -> None:
    out = io.StringIO()
    p = LineProgress("training", 200, every_s=0.0, stream=out)
    p(50, metrics={"loss": 1.23456})
    p(100, 200, metrics={"loss": 0.5})
    p.close()  # nothing new since the last line: no repeat
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("training: 50/200 (25%) ") and lines[0].endswith("loss 1.235")
    assert "eta " not in lines[0]  # no rate before a second update
    assert lines[1].startswith("training: 100/200 (50%) ") and "eta " in lines[1]

    quiet = io.StringIO()
    p = LineProgress("fitting", None, every_s=3600.0, stream=quiet)
    for i in range(1, 6):
        p(i)
    assert quiet.getvalue() == ""  # inside the interval: no line yet
    p.close()
    assert quiet.getvalue().splitlines() == [quiet.getvalue().strip()]
    assert quiet.getvalue().startswith("fitting: 5 ") and "eta" not in quiet.getvalue()


def test_task_progress_in_a_log_and_quiet(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MRISEG_PROGRESS_EVERY", "0")
    with task_progress("encoding", total=3) as p:
        for i in range(1, 4):
            p(i, 3)
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("encoding: 3/3 (100%)") and len(err) == 3

    with task_progress("encoding", total=3, quiet=True) as p:
        assert isinstance(p, StageProgress)
        p(3, 3)
    assert capsys.readouterr().err == ""

    monkeypatch.setenv("MRISEG_PROGRESS_EVERY", "3600")
    with pytest.raises(RuntimeError), task_progress("failing", total=3) as p:
        p(1, 3)
        raise RuntimeError("boom")
    assert "failing" not in capsys.readouterr().err  # a failed stage ends with its error only


def test_eta_ignores_the_time_before_the_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bar opened before a 20-minute tokenizer fit must not turn that into hours of eta."""
    import mrisegcli.progress as progress

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    p = LineProgress("training", 100, every_s=0.0, stream=out)
    clock[0] += 1200.0  # preparation before the first step
    p(1)
    clock[0] += 10.0  # then 1 s a step
    p(11)
    assert (
        out.getvalue()
        .splitlines()[-1]
        .startswith("training: 11/100 (11%) 20m10s elapsed, eta 1m29s")
    )
