#!/usr/bin/env python3
"""The quick start's demo: ``safe-gthread check`` on gunicorn 19.6.0 and the newest.

Builds (or reuses) one venv per gunicorn under .matrix/, the same ones the test matrix
uses, installs safe-gthread from this checkout, and runs ``safe-gthread check`` in
each: gunicorn 19.6.0 on Python 3.6 (the one in benoitc/gunicorn#1298, affected) and 27.0.1 on Python 3.13
(the newest, not affected). Extra arguments go to ``check``, e.g. ``--seconds 10``.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import matrix  # noqa: E402  (the test matrix's venv builder)

DEMO_CELLS = [("19.6.0", "3.6"), ("27.0.1", "3.13")]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    worst = 0
    with matrix.built_wheel() as wheel:
        for gunicorn, python in DEMO_CELLS:
            print("\n=== gunicorn %s on Python %s: preparing its venv" % (gunicorn, python),
                  flush=True)
            venv = matrix.prepare(gunicorn, python, wheel)
            print("=== safe-gthread check", flush=True)
            code = subprocess.call([os.path.join(venv, "bin", "safe-gthread"), "check"] + argv)
            worst = max(worst, code)
    return worst


if __name__ == "__main__":
    sys.exit(main())
