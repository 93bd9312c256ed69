"""A one-line progress bar of training steps, redrawn in place with '\\r':

    train 1,234/10,000 [##........] 12% | loss 2.31 lr 3.0e-4 phase 1 tok/s 12,345 | 3.10 it/s ETA 47:09

Not tqdm: its ETA follows an exponential average of the rate; this one takes the rate over the last
`window` seconds, so a slow start (compilation) does not linger. By default only process 0 draws,
and only on a terminal: logs in files or CI stay free of carriage returns.
"""

from __future__ import annotations

import collections
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import jax

BAR_WIDTH = 20
# Field names shown shorter than the keyword that carries them.
ALIASES = {"tokens_per_sec": "tok/s"}


def format_value(value: Any) -> str:
    """A field value the way the bar shows it: 2.31, 3.0e-4, 12,345, nan."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / jax scalars
            return format_value(value.item())
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) < 1e-2:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def format_duration(seconds: float) -> str:
    """M:SS under an hour, H:MM:SS under a day, then Dd H:MM:SS."""
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}:{minutes:02d}:{s:02d}"
    if hours:
        return f"{hours}:{minutes:02d}:{s:02d}"
    return f"{minutes}:{s:02d}"


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class Progress:
    """A progress bar from `start` to `total` steps on `stream` (default: sys.stderr at construction).

    `enabled`: True/False to force; None draws only when the stream is a TTY and
    `jax.process_index() == 0`. A disabled bar writes nothing (except through `write`).
    `clock` is injectable for tests; `window` is the span (seconds) of the rate behind the ETA.
    """

    def __init__(self, total: int, *, desc: str = "", start: int = 0, stream: TextIO | None = None,
                 enabled: bool | None = None, min_interval: float = 0.5, window: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.total = int(total)
        self.desc = desc
        self.n = int(start)
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            enabled = _is_tty(self.stream) and jax.process_index() == 0
        self.enabled = bool(enabled)
        self.min_interval = float(min_interval)
        self.window = float(window)
        self.fields: dict[str, Any] = {}
        self._clock = clock
        # (time, n) samples for the recent rate; the construction counts as the first.
        self._samples: collections.deque[tuple[float, int]] = collections.deque([(clock(), self.n)])
        self._last_draw = -math.inf
        self._last_len = 0
        self._closed = False
        self._draw(force=True)

    def update(self, n: int = 1, **fields: Any) -> None:
        """Advance by `n` steps; `fields` (e.g. loss=, lr=, phase=) replace the values shown."""
        if self._closed:
            return
        self.n += int(n)
        self.fields.update(fields)
        now = self._clock()
        self._samples.append((now, self.n))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.window:
            self._samples.popleft()
        self._draw(force=self.n >= self.total)

    def write(self, message: str) -> None:
        """Print a whole line (a log message) above the bar, then draw the bar again."""
        if not self.enabled or self._closed:
            print(message, file=self.stream, flush=True)
            return
        self.stream.write("\r" + " " * self._last_len + "\r" + message + "\n")
        self._last_len = 0
        self._draw(force=True)

    def close(self) -> None:
        """Draw the final state and end the line. Idempotent."""
        if self._closed:
            return
        self._draw(force=True)
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
        self._closed = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def rate(self) -> float | None:
        """Steps per second over the recent window; None before two distinct samples."""
        (t_first, n_first), (t_last, n_last) = self._samples[0], self._samples[-1]
        if t_last <= t_first or n_last <= n_first:
            return None
        return (n_last - n_first) / (t_last - t_first)

    def eta(self) -> float | None:
        """Seconds until `total` at the recent rate; 0 when done; None when the rate is unknown."""
        remaining = self.total - self.n
        if remaining <= 0:
            return 0.0
        rate = self.rate()
        return None if rate is None else remaining / rate

    def render(self) -> str:
        """The bar's text (without '\\r')."""
        parts = [f"{self.desc} " if self.desc else ""]
        parts.append(f"{self.n:,}/{self.total:,}")
        frac = min(max(self.n / self.total, 0.0), 1.0) if self.total > 0 else 1.0
        filled = int(frac * BAR_WIDTH)
        parts.append(f" [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {100 * frac:3.0f}%")
        if self.fields:
            shown = " ".join(f"{ALIASES.get(k, k)} {format_value(v)}" for k, v in self.fields.items())
            parts.append(f" | {shown}")
        rate, eta = self.rate(), self.eta()
        speed = "" if rate is None else (f"{rate:.2f} it/s " if rate >= 1 else f"{1 / rate:.2f} s/it ")
        parts.append(f" | {speed}ETA {'?' if eta is None else format_duration(eta)}")
        return "".join(parts)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self._clock()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        line = self.render()
        width = _terminal_width(self.stream)
        if width is not None and len(line) >= width:
            line = line[: width - 1]  # a wrapped line cannot be redrawn with '\r'
        pad = " " * max(self._last_len - len(line), 0)
        self.stream.write("\r" + line + pad)
        self.stream.flush()
        self._last_len = len(line)


def _terminal_width(stream: TextIO) -> int | None:
    try:  # a stream that is not a terminal has no size (OSError, or no fileno at all)
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return None

