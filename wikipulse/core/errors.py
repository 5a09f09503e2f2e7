"""The errors wikipulse raises for people: a bad setting, or something an operator must fix."""


class SettingsError(ValueError):
    """A configuration value that cannot be used; the message names it."""


class OperatorError(Exception):
    """A condition the operator must fix (Redis unreachable, an evicting Redis, a missing stream):
    the command line prints the message as one line and exits 1, without a traceback."""
