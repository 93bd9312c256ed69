"""The progress bar, rendered into a string buffer with a fake clock."""

import io

import pytest

from cpt_jax.progress import Progress, format_duration, format_value


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class TTYBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


def frames(text: str) -> list[str]:
    """What each redraw showed: the text between carriage returns, padding stripped."""
    return [f.rstrip() for f in text.split("\r") if f.strip()]


def test_fields_bar_and_eta():
    out, clock = io.StringIO(), Clock()
    p = Progress(1000, desc="train", stream=out, enabled=True, min_interval=0, clock=clock)
    clock.t += 10.0
    p.update(100, loss=2.3123, lr=3e-4, phase=1, tokens_per_sec=12345.6)
    last = frames(out.getvalue())[-1]
    assert last.startswith("train 100/1,000 [##..................]  10%")
    assert "| loss 2.31 lr 3.0e-4 phase 1 tok/s 12,346 |" in last
    # 100 steps in 10 s: 900 left at 10 it/s = 90 s.
    assert last.endswith("10.00 it/s ETA 1:30")
    # Fields persist and are replaced by newer values.
    clock.t += 10.0
    p.update(100, loss=2.0)
    last = frames(out.getvalue())[-1]
    assert "loss 2 lr 3.0e-4 phase 1" in last and last.endswith("ETA 1:20")


def test_eta_uses_the_recent_rate_only():
    out, clock = io.StringIO(), Clock()
    p = Progress(10_000, stream=out, enabled=True, min_interval=0, window=30, clock=clock)
    clock.t += 600.0  # a slow first step (compilation)
    p.update(1)
    for _ in range(40):  # then 1 step per second
        clock.t += 1.0
        p.update(1)
    assert p.rate() == pytest.approx(1.0)
    assert p.eta() == pytest.approx(10_000 - 41)
    assert frames(out.getvalue())[-1].endswith("1.00 it/s ETA 2:45:59")
    # Slower than a step per second: seconds per step.
    for _ in range(40):
        clock.t += 4.0
        p.update(1)
    assert frames(out.getvalue())[-1].endswith("4.00 s/it ETA 11:01:16")  # (10,000 - 81) * 4 s


def test_no_rate_yet_and_resumed_start():
    out, clock = io.StringIO(), Clock()
    p = Progress(200, desc="train", start=150, stream=out, enabled=True, clock=clock)
    assert frames(out.getvalue()) == ["train 150/200 [###############.....]  75% | ETA ?"]
    clock.t += 5.0
    p.update(10)
    # The rate counts only steps of this session (10 in 5 s), not the 150 before the resume.
    assert p.eta() == pytest.approx(20.0)


def test_redraws_at_most_every_min_interval():
    out, clock = io.StringIO(), Clock()
    p = Progress(100, stream=out, enabled=True, min_interval=0.5, clock=clock)
    for _ in range(10):
        clock.t += 0.125
        p.update(1)
    # The construction and then one redraw per 0.5 s.
    shown = frames(out.getvalue())
    assert [f.split(" ")[0] for f in shown] == ["0/100", "4/100", "8/100"]
    clock.t += 0.125
    p.update(90)  # the last step is always drawn
    assert frames(out.getvalue())[-1].startswith("100/100 [####################] 100%")
    assert frames(out.getvalue())[-1].endswith("ETA 0:00")


def test_close_ends_the_line_once_and_clears_longer_text():
    out, clock = io.StringIO(), Clock()
    p = Progress(10, stream=out, enabled=True, min_interval=0, clock=clock)
    clock.t += 1
    p.update(1, note="a long field value here")
    clock.t += 1
    p.update(1, note="x")
    text = out.getvalue()
    # The shorter redraw pads with spaces over what the longer one left.
    assert len(text.split("\r")[-1]) == len(text.split("\r")[-2])
    p.close()
    p.close()
    p.update(5)  # ignored after close
    assert out.getvalue().endswith("\n") and out.getvalue().count("\n") == 1
    assert frames(out.getvalue())[-1].startswith("2/10")


def test_write_prints_a_line_above_the_bar():
    out, clock = io.StringIO(), Clock()
    with Progress(10, stream=out, enabled=True, min_interval=0, clock=clock) as p:
        clock.t += 1
        p.update(3, loss=1.5)
        p.write("step 2: loss 1.5")
    lines = out.getvalue().split("\n")
    assert lines[0].split("\r")[-1] == "step 2: loss 1.5"
    assert frames(lines[1])[-1].startswith("3/10")
    assert lines[2] == ""  # the context manager closed the bar with a newline


def test_disabled_when_not_a_tty():
    out = io.StringIO()
    p = Progress(10, stream=out)  # enabled=None: StringIO is not a terminal
    assert not p.enabled
    p.update(5, loss=1.0)
    p.close()
    assert out.getvalue() == ""
    p2 = Progress(10, stream=out, enabled=False)
    p2.write("a log line")  # still goes out, as a plain line
    assert out.getvalue() == "a log line\n"


def test_enabled_on_a_tty_of_process_zero():
    out = TTYBuffer()
    p = Progress(10, stream=out, min_interval=0)
    assert p.enabled
    p.update(1)
    p.close()
    assert out.getvalue().startswith("\r0/10") and out.getvalue().endswith("\n")


@pytest.mark.parametrize(
    "value,text",
    [(2.3123, "2.31"), (3e-4, "3.0e-4"), (1.5e-5, "1.5e-5"), (-2e-3, "-2.0e-3"), (12345, "12,345"), (12345.6, "12,346"),
     (0.5, "0.5"), (0.0, "0"), (float("nan"), "nan"), (True, "True"), ("warmup", "warmup"), (1, "1")],
)
def test_format_value(value, text):
    assert format_value(value) == text


def test_format_value_of_numpy_scalars():
    np = pytest.importorskip("numpy")
    assert format_value(np.float32(2.5)) == "2.5"
    assert format_value(np.int64(1234)) == "1,234"


@pytest.mark.parametrize("seconds,text", [(0, "0:00"), (59.6, "1:00"), (90, "1:30"), (3600, "1:00:00"),
                                          (9959, "2:45:59"), (90061, "1d 1:01:01")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
