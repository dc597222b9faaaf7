"""How a retiring worker loses nothing, one module per gunicorn gthread generation.

``legacy`` (19.x - 23.x), ``method_queue`` (24.0 - 27.0.0) and ``graceful`` (27.0.1 and
later) each define ``Retirement``, a mixin placed before gunicorn's ``ThreadWorker``.
Only the module this gunicorn needs is imported; a gunicorn whose shape
``_compat`` does not recognise gets ``Unrecognised``: gunicorn's own stop path.
"""
import importlib

from .. import _compat


class Unrecognised(object):
    """A gunicorn whose gthread loop we do not know: change nothing in its stop path."""


def for_generation(generation=None):
    """The ``Retirement`` mixin for ``generation`` (default: this gunicorn's)."""
    generation = _compat.GTHREAD_GENERATION if generation is None else generation
    if generation is None:
        return Unrecognised
    module = importlib.import_module("%s.%s" % (__name__, generation.replace("-", "_")))
    return module.Retirement
