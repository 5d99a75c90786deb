"""The one exception type for mistakes a user can fix.

Entry points catch it and print its message as a single line; the message names
the problem and the fix.
"""


class UserError(Exception):
  """A configuration or data problem the user can fix (not a bug)."""
