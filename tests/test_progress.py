"""Progress lines of long work: stage names, counted work with an estimate, rate limiting, silence."""

import io

from valley_rt.progress import Progress, duration


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def lines(log: io.StringIO) -> list[str]:
    return log.getvalue().splitlines()


def test_counted_stage_reports_progress_and_an_estimate_from_the_rate_so_far():
    log, clock = io.StringIO(), Clock()
    p = Progress("export", stream=log, every_s=10, clock=clock)
    p.stage("LLM graph", total=32, unit="layers")
    clock.t += 20
    p.advance(8)  # 8 layers in 20 s: 24 left at 2.5 s each
    assert lines(log) == ["export: LLM graph",
                          "export: LLM graph: 8/32 layers (25 %), 20 s elapsed, about 1 min 00 s left"]
    clock.t += 5
    p.advance(10)  # within every_s of the last line: quiet
    assert len(lines(log)) == 2
    clock.t += 55
    p.advance(32)  # the last unit always prints, without an estimate
    assert lines(log)[-1] == "export: LLM graph: 32/32 layers (100 %), 1 min 20 s elapsed"
    p.done()
    assert lines(log)[-1] == "export: done in 1 min 20 s"


def test_bytes_are_shown_in_gigabytes():
    log, clock = io.StringIO(), Clock()
    p = Progress("convert", stream=log, every_s=0, clock=clock)
    p.stage("writing 3 tensors", total=6 * 2**30, unit="GB")
    clock.t += 30
    p.advance(1.5 * 2**30)
    assert lines(log)[-1] == "convert: writing 3 tensors: 1.5/6.0 GB (25 %), 30 s elapsed, about 1 min 30 s left"


def test_a_stage_without_a_count_prints_only_its_name():
    log = io.StringIO()
    p = Progress("export", stream=log, every_s=0)
    p.stage("vision: tracing the ONNX graph")
    p.advance(3)
    assert lines(log) == ["export: vision: tracing the ONNX graph"]


def test_no_command_is_silent(capsys):
    p = Progress(None, every_s=0)
    p.stage("x", total=2)
    p.advance(1)
    p("message")
    p.done()
    assert capsys.readouterr() == ("", "")


def test_duration():
    assert [duration(s) for s in (0.4, 59, 60, 3599, 3600, 3725)] == \
        ["0 s", "59 s", "1 min 00 s", "59 min 59 s", "1 h 00 min", "1 h 02 min"]
