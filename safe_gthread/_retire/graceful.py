"""gunicorn >= 27.0.1: its own stop path loses nothing but pipelined requests; bring the
successor early.

This module is tied to one gunicorn generation and should never need to change.
"""
from .. import _schedule
from ._common import AnswerPipelinedWhileRetiring


class Retirement(AnswerPipelinedWhileRetiring):
    """Announce the retirement to the arbiter when the loop stops accepting.

    27.0.1 answers pipelined requests itself (``finish_request`` re-queues a connection
    whose parser holds the next one), but a response given once ``alive`` is False says
    ``Connection: close`` and drops the rest: ``AnswerPipelinedWhileRetiring``.
    """

    def set_accept_enabled(self, enabled):
        super(Retirement, self).set_accept_enabled(enabled)
        if not enabled and not self.alive:
            self._retirement_started()

    def _retirement_started(self):
        _schedule.stopped_accepting(self)
