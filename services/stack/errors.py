"""Errors of the local launchers (Kafka, Triton, the services)."""

from __future__ import annotations


class LaunchError(RuntimeError):
    """A local server could not be started, or died while starting.

    The message says why in one line (port taken, binary missing, process exited), followed
    where useful by the tail of the server's own log.
    """
