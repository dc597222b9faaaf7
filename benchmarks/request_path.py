#!/usr/bin/env python3
"""The request path's cost, stock vs safe, in one process: microseconds per request.

Throughput pairs on a 2-core machine swing +-15 % between identical runs: they cannot see
a 2 % difference. Here one process builds a stock ``ThreadWorker`` and a
``safe_gthread.Worker`` of the same gunicorn (the safe one with the retirement scheduler
installed and ``max_requests`` set, so its per-iteration checks run), and drives each
through what one request costs a worker: ``handle()`` on a connection holding one
request (parse, the app, the response; ``handle_request`` is the safe worker's own) and
one ``notify()`` (what the loop calls per iteration; at most one per request). Rounds of
``--batch`` requests alternate between the two, so the machine's drift hits both alike;
the figure is the median of the rounds' ratios.

Timings on a busy machine stay noisy, so it also counts: one round per worker under
``sys.settrace`` gives the Python lines executed per request, and under
``sys.setprofile`` the function calls (Python and C) per request. Those counts do not
depend on the machine's load; their safe / stock ratios are the cost in work done.

    python3 benchmarks/request_path.py --versions 27.0.1:3.13,23.0.0:3.12

Each version runs in its own venv under .bench/ (benchmarks/run.py's), with the package
installed from a wheel.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


def make_worker(cls, cfg, log):
    worker = cls(1, os.getpid(), [], None, 30, cfg, log)
    worker.wsgi = app
    worker.alive = True
    worker.booted = True
    return worker


def one_round(worker, tconn, cfg, batch, init):
    """Seconds for ``batch`` requests through ``worker`` (``init``: the loop, not
    ``handle``, initialises a new connection, as on gunicorn < 24)."""
    pairs = [socket.socketpair() for _ in range(batch)]
    for client, _ in pairs:
        client.sendall(REQUEST)
    started = time.perf_counter()
    for _, server in pairs:
        conn = tconn(cfg, server, ("127.0.0.1", 1), ("127.0.0.1", 2))
        try:
            conn.data_ready = True  # gunicorn >= 25: the poller saw it readable
        except AttributeError:
            pass
        if init:
            conn.init()
        worker.handle(conn)
        worker.notify()
    took = time.perf_counter() - started
    for client, server in pairs:
        client.close()
        server.close()
    return took


def count(worker, tconn, cfg, batch, init):
    """(Python lines, function calls) per request through ``worker``: one round under
    ``sys.settrace``, one under ``sys.setprofile`` (same thread, nothing else running)."""
    lines, calls = [0], [0]

    def tracer(frame, event, arg):
        if event == "line":
            lines[0] += 1
        return tracer

    def profiler(frame, event, arg):
        if event in ("call", "c_call"):
            calls[0] += 1

    sys.settrace(tracer)
    try:
        one_round(worker, tconn, cfg, batch, init)
    finally:
        sys.settrace(None)
    sys.setprofile(profiler)
    try:
        one_round(worker, tconn, cfg, batch, init)
    finally:
        sys.setprofile(None)
    return lines[0] / float(batch), calls[0] / float(batch)


def measure(spec):
    import inspect

    import gunicorn
    from gunicorn.config import Config
    from gunicorn.glogging import Logger
    from gunicorn.workers.gthread import TConn, ThreadWorker

    from safe_gthread import _schedule, _worker

    cfg = Config()
    cfg.set("max_requests", 10 ** 9)  # the safe worker's look runs; no worker retires
    cfg.set("keepalive", 0)
    log = Logger(cfg)
    _schedule.install()
    workers = {"stock": make_worker(ThreadWorker, cfg, log),
               "safe": make_worker(_worker.Worker, cfg, log)}
    safe = workers["safe"]
    safe._safe_ready_at, safe._safe_lead_seconds = time.monotonic(), 1.0  # as run() sets
    init = "conn.init()" not in inspect.getsource(ThreadWorker.handle)
    for worker in workers.values():
        one_round(worker, TConn, cfg, spec["batch"], init)  # warm up
    ratios, seconds = [], {"stock": 0.0, "safe": 0.0}
    for number in range(spec["rounds"]):
        order = ("stock", "safe") if number % 2 == 0 else ("safe", "stock")
        took = {name: one_round(workers[name], TConn, cfg, spec["batch"], init)
                for name in order}
        ratios.append(took["safe"] / took["stock"])
        for name in took:
            seconds[name] += took[name]
    ratios.sort()
    requests = spec["rounds"] * spec["batch"]
    counted = {name: count(workers[name], TConn, cfg, spec["batch"], init)
               for name in ("stock", "safe")}
    return {"gunicorn": gunicorn.__version__, "python": "%d.%d" % sys.version_info[:2],
            "stock_us": 1e6 * seconds["stock"] / requests,
            "safe_us": 1e6 * seconds["safe"] / requests,
            "median_ratio": ratios[len(ratios) // 2],
            "ratio_p10": ratios[len(ratios) // 10], "ratio_p90": ratios[9 * len(ratios) // 10],
            "requests": requests,
            "stock_lines": counted["stock"][0], "safe_lines": counted["safe"][0],
            "stock_calls": counted["stock"][1], "safe_calls": counted["safe"][1]}


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print(json.dumps(measure(json.loads(sys.argv[2]))))
        return
    sys.path.insert(0, HERE)
    import run as _run
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--versions", default="27.0.1:3.13,23.0.0:3.12")
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    wheel = _run.build_wheel(os.path.dirname(HERE))
    rows = []
    for item in args.versions.split(","):
        version, python = item.split(":")
        venv = _run.prepare_venv(version, python, wheel)
        print("gunicorn %s: %d rounds of %d requests per worker..." % (
            version, args.rounds, args.batch), file=sys.stderr, flush=True)
        proc = subprocess.run(
            [os.path.join(venv, "bin", "python"), os.path.abspath(__file__), "--measure",
             json.dumps({"rounds": args.rounds, "batch": args.batch})],
            stdout=subprocess.PIPE, universal_newlines=True, check=True, cwd=_run.BENCH_DIR)
        fig = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append((fig["gunicorn"], fig["python"], "%.1f" % fig["stock_us"],
                     "%.1f" % fig["safe_us"], "%.3f [%.3f-%.3f]" % (
                         fig["median_ratio"], fig["ratio_p10"], fig["ratio_p90"]),
                     "{:,}".format(fig["requests"]),
                     "%.0f / %.0f = %.3f" % (fig["stock_lines"], fig["safe_lines"],
                                             fig["safe_lines"] / fig["stock_lines"]),
                     "%.0f / %.0f = %.3f" % (fig["stock_calls"], fig["safe_calls"],
                                             fig["safe_calls"] / fig["stock_calls"])))
    _run.print_table(("gunicorn", "Python", "stock us/request", "safe us/request",
                      "safe / stock (median of rounds [p10-p90])", "requests each",
                      "Python lines per request, stock / safe", "calls per request, "
                      "stock / safe"), rows)


if __name__ == "__main__":
    main()
