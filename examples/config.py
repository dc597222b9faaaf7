# gunicorn settings: the configuration of the original report (a Japanese write-up
# that reproduced benoitc/gunicorn#1298, gunicorn 19.6.0 deleting its unix socket after
# max_requests, behind h2o under wrk).
#
#   gunicorn -c config.py web:app
#
# Four lines differ from the original: worker_class (the fix); bind, umask and group
# (the original's /tmp/gunicorn.sock with umask = 0 was mode 0777 in a directory every
# local user shares: anyone on the host could send requests to the app). Remove the
# worker_class line again once you run a gunicorn that no longer needs it (see
# docs/upgrading.md); nothing else here depends on it.
#
# /run/gunicorn must exist and belong to www-data: gunicorn.service creates it
# (RuntimeDirectory=gunicorn); elsewhere, as root, once per boot:
#   install -d -o www-data -g www-data -m 0755 /run/gunicorn

bind = 'unix:/run/gunicorn/gunicorn.sock'
backlog = 2048

workers = 5
threads = 5
# The original said worker_class = 'sync'. With threads > 1, gunicorn silently
# replaces 'sync' with its threaded worker, 'gthread' -- the worker that deletes
# the socket on 19.6.0. safe_gthread.Worker is that same threaded worker, fixed.
worker_class = "safe_gthread.Worker"
worker_connections = 1000
timeout = 30
keepalive = 2

max_requests = 512

spew = False

daemon = False
pidfile = None
# The socket is created mode 0770, owned by group: only that group's members (the
# proxy's workers) may connect. gunicorn runs as www-data here (gunicorn.service,
# supervisor.conf) and so do the proxies' workers (nginx.conf, h2o.conf; Debian's
# packaged nginx too). A process that is not root can only give the socket a group it
# is in: with another group here, gunicorn fails at bind ("Permission denied").
# The workers run with that group too.
umask = 0o007
user = None
group = 'www-data'
tmp_upload_dir = None

#   Logging
errorlog = '-'
loglevel = 'info'
accesslog = '-'
access_log_format = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'

# Process naming
proc_name = None

# Server hooks
def post_fork(server, worker):
    server.log.info("Worker spawned (pid: %s)", worker.pid)

def pre_fork(server, worker):
    pass

def pre_exec(server):
    server.log.info("Forked child, re-executing.")

def when_ready(server):
    server.log.info("Server is ready. Spawning workers")

def worker_int(worker):
    worker.log.info("worker received INT or QUIT signal")

    ## get traceback info
    import threading, sys, traceback
    id2name = dict([(th.ident, th.name) for th in threading.enumerate()])
    code = []
    for threadId, stack in sys._current_frames().items():
        code.append("\n# Thread: %s(%d)" % (id2name.get(threadId,""),
            threadId))
        for filename, lineno, name, line in traceback.extract_stack(stack):
            code.append('File: "%s", line %d, in %s' % (filename,
                lineno, name))
            if line:
                code.append("  %s" % (line.strip()))
    worker.log.debug("\n".join(code))

def worker_abort(worker):
    worker.log.info("worker received SIGABRT signal")
