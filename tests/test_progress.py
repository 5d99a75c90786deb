"""What a long compile says: plain lines off a terminal, a counting line on one."""

import io
import re
import time

import pytest

from t5x_lite import progress


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def test_off_a_terminal_two_plain_lines():
  out = io.StringIO()
  with progress.compiling('the train step', stream=out) as timer:
    pass
  assert out.getvalue() == ('compiling the train step ...\n'
                            f'compiled the train step in {timer.seconds:.1f}s\n')
  out = io.StringIO()
  with progress.compiling('x', stream=out, keep=False):  # kept: a log has no line to erase
    pass
  assert out.getvalue().splitlines() == ['compiling x ...', 'compiled x in 0.0s']


def test_on_a_terminal_the_line_counts_then_gives_way():
  out = _Terminal()
  with progress.compiling('the train step', stream=out) as timer:
    time.sleep(1.5)
  text = out.getvalue()
  ticks = re.findall(r'\rcompiling the train step \.\.\. (\d+)s', text)
  assert len(ticks) >= 2 and ticks[0] == '0' and ticks == sorted(ticks, key=int), text
  assert text.endswith(f'\r\033[Kcompiled the train step in {timer.seconds:.1f}s\n'), text
  assert timer.seconds >= 1.5
  out = _Terminal()
  with progress.compiling('x', stream=out, keep=False):
    pass
  assert out.getvalue() == '\rcompiling x ... 0s\r\033[K'


def test_a_failed_compile_is_not_reported_as_compiled():
  out = io.StringIO()
  with pytest.raises(RuntimeError):
    with progress.compiling('x', stream=out):
      raise RuntimeError('no')
  assert out.getvalue() == 'compiling x ...\n'


def test_other_processes_stay_quiet():
  out = _Terminal()
  with progress.compiling('x', stream=out, enabled=False) as timer:
    pass
  assert out.getvalue() == '' and timer.seconds >= 0
