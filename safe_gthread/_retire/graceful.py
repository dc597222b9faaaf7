"""gunicorn >= 27.0.1: its own stop path loses nothing; only bring the successor early.

This module is tied to one gunicorn generation and should never need to change.
"""
from .. import _schedule


class Retirement(object):
    """Announce the retirement to the arbiter when the loop stops accepting."""

    def set_accept_enabled(self, enabled):
        super(Retirement, self).set_accept_enabled(enabled)
        if not enabled and not self.alive:
            self._retirement_started()

    def _retirement_started(self):
        _schedule.stopped_accepting(self)
