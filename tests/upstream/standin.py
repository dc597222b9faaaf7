"""safe_gthread.Worker in place of gunicorn's gthread worker, and the expected failures.

Imported by ``sitecustomize`` (see there). Also a pytest plugin (``-p standin``) for the
run of gunicorn's own tests: it marks the expected failures that tests/test_upstream.py
passes in ``SAFE_GTHREAD_UPSTREAM_XFAIL`` (JSON: node id -> reason) as strict xfails,
so an expected failure that starts passing fails the run too.
"""
import json
import os

from gunicorn.workers import gthread

import safe_gthread

safe_gthread.Worker.setup()
gthread.ThreadWorker = safe_gthread.Worker


def pytest_collection_modifyitems(config, items):
    import pytest

    expected = json.loads(os.environ.get("SAFE_GTHREAD_UPSTREAM_XFAIL") or "{}")
    for item in items:
        # "tests/test_sock.py::test_x[param]" -> also matched as "test_sock.py::test_x"
        path, _, rest = item.nodeid.partition("::")
        name = "%s::%s" % (os.path.basename(path), rest)
        reason = expected.get(name) or expected.get(name.split("[")[0])
        if reason:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
