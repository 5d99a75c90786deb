"""Progress of a long silent phase (compiling a step) as a user reads it.

    with progress.compiling('the train step') as timer:
      trainer.compile()
    timer.seconds

Off a terminal (a log file, a pipe, a test) it writes two plain lines,
`compiling the train step ...` before and `compiled the train step in 12.3s`
after. On a terminal the first line counts the elapsed seconds in place and
the second replaces it (or, with `keep=False`, the line is erased when done,
for callers that print their own result).
"""

import contextlib
import dataclasses
import sys
import threading
import time
from typing import Iterator, Optional, TextIO

_ERASE = '\r\033[K'


@dataclasses.dataclass
class Timer:
  """The seconds the phase took (set when it ends)."""
  seconds: float = 0.0


@contextlib.contextmanager
def compiling(what: str, stream: Optional[TextIO] = None, keep: bool = True,
              enabled: bool = True) -> Iterator[Timer]:
  """Says that `what` is being compiled, then how long it took (see the module
  doc). `stream` defaults to stdout; `enabled=False` (processes other than the
  first) only times it."""
  stream = stream or sys.stdout
  timer = Timer()
  start = time.perf_counter()
  live = enabled and _is_terminal(stream)
  ticking = threading.Event()
  ticker = None
  if enabled and not live:
    stream.write(f'compiling {what} ...\n')
    stream.flush()
  elif live:
    ticker = threading.Thread(target=_tick, args=(stream, what, start, ticking), daemon=True)
    ticker.start()
  done = False
  try:
    yield timer
    done = True
  finally:
    timer.seconds = time.perf_counter() - start
    if ticker is not None:
      ticking.set()
      ticker.join()
      stream.write(_ERASE)
    if enabled and done and (keep or not live):
      stream.write(f'compiled {what} in {timer.seconds:.1f}s\n')
    if enabled:
      stream.flush()


def _tick(stream: TextIO, what: str, start: float, done: threading.Event) -> None:
  """Rewrites `compiling <what> ... <n>s` every second until `done`."""
  while True:
    stream.write(f'\rcompiling {what} ... {time.perf_counter() - start:.0f}s')
    stream.flush()
    if done.wait(1.0):
      return


def _is_terminal(stream: TextIO) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False
