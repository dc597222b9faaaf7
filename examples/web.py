# -*- coding:utf-8 -*-
"""The original bug report's "Hello World" app as plain WSGI (no framework to install).

    gunicorn -c config.py web:app

The original used bottle 0.12.13, which does not install on new Pythons; any WSGI
app works the same way with safe_gthread.Worker.
"""


def app(environ, start_response):
    body = b"Hello World"
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
