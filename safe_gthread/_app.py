"""The bundled WSGI app for ``safe-gthread check`` and the tests: no framework needed.

``GET`` any path: ``Hello World``. ``POST``: reads the body, answers its length.
"""


def app(environ, start_response):
    if environ["REQUEST_METHOD"] == "POST":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = ("%d bytes" % len(environ["wsgi.input"].read(length))).encode()
    else:
        body = b"Hello World"
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
