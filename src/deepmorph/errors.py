"""One error hierarchy for deepmorph (after GalSim's ``GalSimError``).

Every error a user can cause by bad input derives from :class:`DeepmorphError`,
so the command line can turn it into a one-line message and exit code 2
without a traceback.
"""

from __future__ import annotations


class DeepmorphError(Exception):
    """Base class of every error deepmorph raises on purpose."""


class DeepmorphValueError(DeepmorphError, ValueError):
    """A parameter or an input array has a value deepmorph cannot use."""


class DeepmorphIOError(DeepmorphError, OSError):
    """A file is missing, unreadable, corrupt, or would be overwritten."""
