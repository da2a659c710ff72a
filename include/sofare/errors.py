"""The one error taxonomy: every stage signals "give up" or "try again" with these, never with a bare
ValueError. DAG tasks map them to Airflow (`orchestration.run`): a `PermanentError` fails the task at
once (retrying would fail the same way), a `TransientError` keeps Airflow's retries with back-off.
Anything else is a bug and gets the default retries.
"""

from __future__ import annotations


class SofareError(Exception):
    """Base of every error SOFARE raises on purpose; the message is one line a person can act on."""


class PermanentError(SofareError):
    """Bad input, bad configuration, failed validation, something missing: fail now, no retry."""


class TransientError(SofareError):
    """Network trouble, rate limits, locks, a server starting: retry with back-off."""


class InputError(PermanentError, ValueError):
    """A parameter or a request is invalid; the message names it (also a ValueError for callers)."""


class NotFoundError(PermanentError, LookupError):
    """What was asked for does not exist (a model version, an alias, a study, a bento)."""
