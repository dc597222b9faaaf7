# gunicorn settings: the configuration of the original bug report (a Japanese write-up
# that reproduced benoitc/gunicorn#1298, gunicorn 19.6.0 deleting its unix socket after
# max_requests, behind h2o under wrk), with one line changed.
#
#   gunicorn -c config.py web:app
#
# The changes are worker_class, and umask and group (the original's umask = 0 made the
# socket mode 0777: any local user could send requests to the app). Remove the
# worker_class line again once you run a gunicorn that no longer needs it (see
# docs/upgrading.md); nothing else here depends on it.

bind = 'unix:/tmp/gunicorn.sock'
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
# The socket is created mode 0770, owned by group: set group to your proxy's group
# ("nogroup" for h2o or nginx running as nobody, as in h2o.conf and nginx.conf here;
# "www-data" for Debian's packaged nginx). The workers run with that group too.
umask = 0o007
user = None
group = 'nogroup'
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
