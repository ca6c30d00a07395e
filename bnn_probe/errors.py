"""Errors bnn-probe raises for bad input. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class BnnProbeError(Exception):
    """Bad input or an unreadable log: the message says what is wrong and what to do."""


class RunLogError(BnnProbeError, ValueError):
    """A run directory that is missing, broken, or of a newer schema version."""
