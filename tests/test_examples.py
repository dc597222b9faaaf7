"""Every file under examples/ is started for real, as its comments say to run it.

The files keep their deployment's paths (/run/gunicorn/gunicorn.sock, port 18080,
/srv/app): each test reads a file, replaces exactly those texts with its own (a socket
in a private directory, a free loopback port), checks that each replacement matched,
and runs the result. Servers run in a new session and are ended by process group.
"""
import ast
import configparser
import grp
import pwd
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from safe_gthread.check import load as _load, procs as _procs
from safe_gthread.check.runner import Gunicorn, ServerError, gunicorn_script

from conftest import require_root, require_tool
from versions import STOCK_WORKERS_UNLINK

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
SOCKET = "/run/gunicorn/gunicorn.sock"
REPORT_PORT = "18080"
APP_DIR = "/srv/app"

#: The original report's config.py, setting by setting (hooks aside): examples/config.py
#: must keep every one of them but worker_class, and bind, umask and group (the safe
#: form: a socket in its own directory, connectable by the proxy's group only).
REPORT_SETTINGS = {
    "bind": "unix:/tmp/gunicorn.sock", "backlog": 2048, "workers": 5, "threads": 5,
    "worker_class": "sync", "worker_connections": 1000, "timeout": 30, "keepalive": 2,
    "max_requests": 512, "spew": False, "daemon": False, "pidfile": None, "umask": 0,
    "user": None, "group": None, "tmp_upload_dir": None, "errorlog": "-",
    "loglevel": "info", "accesslog": "-",
    "access_log_format": '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"',
    "proc_name": None,
}
REPORT_HOOKS = ["post_fork", "pre_fork", "pre_exec", "when_ready", "worker_int", "worker_abort"]

#: Becomes LISTEN_FDS/LISTEN_PID's process: puts the socket at fd 3, then execs gunicorn
#: under the same pid, as systemd does.
SYSTEMD_WRAPPER = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


def read_example(name):
    with open(os.path.join(EXAMPLES, name)) as fh:
        return fh.read()


def replace(text, old, new, count=None):
    """``text.replace(old, new)`` that fails when the example no longer has ``old``."""
    found = text.count(old)
    assert found and (count is None or found == count), \
        "%r found %d times in the example, expected %s" % (old, found, count or "some")
    return text.replace(old, new)


def replace_line(text, pattern, new):
    result, found = re.subn(pattern, new, text, flags=re.M)
    assert found == 1, "%r matched %d lines in the example, expected 1" % (pattern, found)
    return result


def settings_of(source):
    """The module-level ``name = literal`` settings and the hook names of a config file."""
    settings, hooks = {}, []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            settings[node.targets[0].id] = ast.literal_eval(node.value)
        elif isinstance(node, ast.FunctionDef):
            hooks.append(node.name)
    return settings, hooks


@pytest.fixture
def app_dir():
    """A directory other users can enter (h2o and nginx workers run as nobody), short
    enough for sockaddr_un; removed afterwards."""
    path = tempfile.mkdtemp(prefix="sg-ex-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def started():
    """Everything a test starts: ``stop()`` is called on each at teardown."""
    things = []
    yield things
    for thing in reversed(things):
        thing.stop()


def install_app(directory, bind=None, max_requests=20, worker_line=None, group_line=None):
    """examples/config.py and web.py in ``directory`` as config.py and web.py, the socket
    moved into ``directory``, two workers, a small max_requests, the error log to a file."""
    config = read_example("config.py")
    config = replace(config, "unix:" + SOCKET,
                     bind or "unix:" + os.path.join(directory, "gunicorn.sock"), count=1)
    if group_line is not None:
        config = replace_line(config, r"^group = 'www-data'$", group_line)
    config = replace_line(config, r"^workers = 5$", "workers = 2")
    config = replace_line(config, r"^max_requests = 512$", "max_requests = %d" % max_requests)
    config = replace_line(config, r"^errorlog = '-'$",
                          "errorlog = %r" % os.path.join(directory, "gunicorn.log"))
    if worker_line is not None:
        config = replace_line(config, r'^worker_class = "safe_gthread.Worker"$', worker_line)
    with open(os.path.join(directory, "config.py"), "w") as fh:
        fh.write(config)
    shutil.copy(os.path.join(EXAMPLES, "web.py"), os.path.join(directory, "web.py"))


def deployed_command(text, directory):
    """A unit's or program's command with /srv/app/venv and /srv/app made real."""
    text = text.replace(APP_DIR + "/venv/bin/gunicorn", gunicorn_script())
    return replace(text, APP_DIR, directory)


class ExampleServer(Gunicorn):
    """gunicorn started with a given command line (the supervisor program's, the systemd
    unit's) in ``directory``, with the examples' config.py and web.py installed there."""

    def __init__(self, directory, argv, sock_path, pass_fds=(), env=None):
        self.env = env
        self.directory = directory
        self.sock_path = sock_path
        self.log_path = os.path.join(directory, "gunicorn.log")
        self.settings = {"workers": 2}
        self.argv = argv
        self.pass_fds = pass_fds
        self.proc = None

    def start(self, wait=True, timeout=20.0):
        self._out = open(os.path.join(self.directory, "gunicorn.out"), "wb")
        self.proc = subprocess.Popen(self.argv, cwd=self.directory, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     pass_fds=self.pass_fds, env=self.env)
        if wait:
            self.wait_ready(timeout)
        return self


def supervisor_program():
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read_string(read_example("supervisor.conf"))
    return parser["program:gunicorn"]


def unit(name):
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str
    parser.read_string(read_example(name))
    return parser


def load(address, server, restarts=5, seconds=30.0, until_lost=False):
    # Until ``restarts`` restarts, counted as workers booted: a retiring worker serves while
    # its successor boots, so the count, not the requests sent, says when to stop. A
    # control that loses the socket file stops there (nothing restarts after it).
    return _load.run_load(address, seconds=seconds, concurrency=4,
                          stop=lambda: server.restarts() >= restarts
                          or (until_lost and server.inode() is None))


# -- config.py and web.py ------------------------------------------------------------------

def test_config_py_is_the_reports_with_the_fix_and_a_private_socket():
    settings, hooks = settings_of(read_example("config.py"))
    expected = dict(REPORT_SETTINGS, worker_class="safe_gthread.Worker", umask=0o007,
                    group="www-data", bind="unix:" + SOCKET)
    assert settings == expected
    assert hooks == REPORT_HOOKS


def test_web_py_is_the_reports_bottle_app():
    import bottle
    assert bottle.__version__ == "0.13.5", "examples/web.py names bottle 0.13.5"
    assert "pip install bottle==%s" % bottle.__version__ in read_example("web.py")
    namespace = {}
    exec(compile(read_example("web.py"), "web.py", "exec"), namespace)
    assert isinstance(namespace["app"], bottle.Bottle)
    seen = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "SERVER_NAME": "localhost",
               "SERVER_PORT": "80", "wsgi.url_scheme": "http"}
    body = b"".join(namespace["app"](environ, lambda status, headers, *exc: seen.append(status)))
    assert (seen, body) == (["200 OK"], b"Hello World")


@pytest.mark.parametrize("variant", ["example", "report"])
def test_config_py_serves_and_keeps_the_socket_across_restarts(app_dir, started, variant):
    """The supervisor program's command line, with examples/config.py. The original report's own
    line (``worker_class = 'sync'`` with threads: stock gthread) is the control: it must
    lose the socket where stock workers unlink it, gunicorn <= 19.6.0."""
    worker_line = "worker_class = 'sync'" if variant == "report" else None
    install_app(app_dir, worker_line=worker_line)
    program = supervisor_program()
    argv = shlex.split(deployed_command(program["command"], app_dir))
    assert deployed_command(program["directory"], app_dir) == app_dir
    sock = os.path.join(app_dir, "gunicorn.sock")
    server = ExampleServer(app_dir, argv, sock)
    started.append(server)
    server.start()
    assert _load.request(sock)[2] == b"Hello World"
    inode = server.inode()
    # umask = 0o007, group = www-data: the proxies' group (their workers run as
    # www-data) may connect, other local users may not.
    st = os.stat(sock)
    assert stat.S_IMODE(st.st_mode) == 0o770
    assert grp.getgrgid(st.st_gid).gr_name == "www-data"

    result = load(sock, server, until_lost=variant == "report")
    if variant == "report":
        if STOCK_WORKERS_UNLINK:
            assert server.inode() is None, "control: stock 19.6.0 should lose the socket\n" \
                + server.log()
        else:
            assert server.inode() == inode
        return
    assert server.restarts() >= 5, server.log()
    assert result.failed == 0, (result.as_dict(), server.log())
    assert server.inode() == inode
    assert server.serves()
    log = server.errorlog()
    assert server.tracebacks() == 0, server.log()
    assert "safe-gthread" in log and "Worker spawned (pid:" in log  # the boot line, the hook

    server.signal(signal.SIGTERM)
    # A worker still booting when TERM comes has the arbiter's handlers yet and misses it
    # (stock gunicorn); the arbiter kills it after graceful_timeout, 30 s in the original
    # report's config. The stop must still end cleanly and remove the socket.
    assert server.wait_exit(timeout=45) == 0, server.log()
    assert server.inode() is None  # its clean stop removes the socket it bound


# -- h2o and nginx in front --------------------------------------------------------------

def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Proxy(object):
    def __init__(self, directory, argv):
        self.directory = directory
        self.argv = argv
        self.proc = None

    def start(self, port, timeout=20.0):
        self._out = open(os.path.join(self.directory, "proxy.out"), "wb")
        self.proc = subprocess.Popen(self.argv, cwd=self.directory, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError("%s exited with %s\n%s" % (
                    self.argv[0], self.proc.returncode, self.log()))
            try:
                if _load.request(("127.0.0.1", port), timeout=2.0)[0] == 200:
                    return self
            except (OSError, EOFError, ValueError):
                pass
            time.sleep(0.05)
        raise ServerError("%s did not answer in %ss\n%s" % (self.argv[0], timeout, self.log()))

    def log(self):
        with open(os.path.join(self.directory, "proxy.out"), errors="replace") as fh:
            return fh.read()[-10000:]

    def stop(self):
        if self.proc is None:
            return
        _procs.stop_group(self.proc, self.proc.pid, 10.0)
        self._out.close()


def h2o_config(directory, sock, port):
    text = read_example("h2o.conf")
    text = replace(text, SOCKET, sock, count=1)
    text = replace(text, "  port: %s\n" % REPORT_PORT,
                   "  host: 127.0.0.1\n  port: %d\n" % port, count=1)
    text = replace(text, "access-log: /dev/stdout",
                   "access-log: %s" % os.path.join(directory, "access.log"), count=1)
    return text


def nginx_config(directory, sock, port):
    text = read_example("nginx.conf")
    text = replace(text, "server unix:%s " % SOCKET, "server unix:%s " % sock, count=1)
    text = replace(text, "listen %s;" % REPORT_PORT, "listen 127.0.0.1:%d;" % port, count=1)
    text = replace(text, "pid /tmp/nginx-gunicorn.pid;",
                   "pid %s;" % os.path.join(directory, "nginx.pid"), count=1)
    text = replace(text, "access_log /dev/stdout;",
                   "access_log %s;" % os.path.join(directory, "access.log"), count=1)
    # Temporary files in the test's directory, not the distribution's /var/lib/nginx.
    temp = "".join("    %s_temp_path %s;\n" % (kind, os.path.join(directory, kind))
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return replace(text, "http {\n", "http {\n" + temp, count=1)


@pytest.mark.parametrize("kind", ["h2o", "nginx"])
def test_proxy_example_in_front_of_config_py(app_dir, started, kind):
    """The proxy's example config, as is but for paths and port, forwards to gunicorn
    started with examples/config.py; through it, every request is answered while the
    workers restart."""
    binary = require_tool(kind)
    install_app(app_dir)
    sock = os.path.join(app_dir, "gunicorn.sock")
    server = ExampleServer(app_dir, [gunicorn_script(), "-c", "config.py", "web:app"], sock)
    started.append(server)
    server.start()
    inode = server.inode()

    port = free_port()
    conf = os.path.join(app_dir, kind + ".conf")
    with open(conf, "w") as fh:
        if kind == "h2o":
            fh.write(h2o_config(app_dir, sock, port))
            argv = [binary, "-c", conf]
        else:
            fh.write(nginx_config(app_dir, sock, port))
            argv = [binary, "-p", app_dir, "-c", conf]
    proxy = Proxy(app_dir, argv)
    started.append(proxy)
    proxy.start(port)
    status, _, body = _load.request(("127.0.0.1", port))
    assert (status, body) == (200, b"Hello World")

    result = load(("127.0.0.1", port), server)
    assert server.restarts() >= 5, server.log()
    assert result.failed == 0, (result.as_dict(), server.log(), proxy.log())
    assert server.inode() == inode
    assert "Traceback" not in server.log()


# -- systemd ---------------------------------------------------------------------------------

SOCKET_ACTIVATED = "gunicorn-socket-activated.service"


def test_systemd_units_are_consistent_with_config_py():
    plain, activated = unit("gunicorn.service"), unit(SOCKET_ACTIVATED)
    sock_unit = unit("gunicorn.socket")
    assert sock_unit.sections() == ["Unit", "Socket", "Install"]
    # The plain unit binds its socket itself and names no socket unit.
    for key in ("Wants", "Requires", "BindsTo"):
        assert "gunicorn.socket" not in plain["Unit"].get(key, "")
    assert "gunicorn.socket" not in plain["Unit"].get("After", "")
    assert "gunicorn.socket" in activated["Unit"]["Requires"].split()
    assert "gunicorn.socket" in activated["Unit"]["After"].split()
    settings, _ = settings_of(read_example("config.py"))
    for service in (plain, activated):
        assert service.sections() == ["Unit", "Service", "Install"]
        argv = shlex.split(service["Service"]["ExecStart"])
        assert argv == shlex.split(supervisor_program()["command"])
        assert argv[-1] == "web:app" and argv[1:3] == ["-c", APP_DIR + "/config.py"]
        assert service["Service"]["WorkingDirectory"] == APP_DIR
        assert service["Service"]["KillMode"] == "mixed"
        assert service["Service"]["KillSignal"] == "SIGTERM"
        graceful = settings.get("graceful_timeout", 30)
        assert int(service["Service"]["TimeoutStopSec"]) > graceful
        assert service["Service"]["User"] == "www-data"
        assert service["Service"]["PrivateTmp"] == "true"  # the socket is not in /tmp
    # Apart from how they find the socket, the two units run gunicorn the same way: the
    # plain one has systemd create the socket's directory, /run/gunicorn, for its User=.
    runtime = {"RuntimeDirectory": "gunicorn", "RuntimeDirectoryMode": "0755"}
    assert dict(plain["Service"]) == dict(activated["Service"], **runtime)
    assert settings["bind"] == "unix:/run/%s/gunicorn.sock" % runtime["RuntimeDirectory"]
    # The socket unit listens where config.py binds, as the proxies expect, for the
    # group config.py gives the socket.
    assert "unix:" + sock_unit["Socket"]["ListenStream"] == settings["bind"]
    assert int(sock_unit["Socket"]["Backlog"]) == settings["backlog"]
    assert sock_unit["Socket"]["SocketGroup"] == settings["group"]
    assert int(sock_unit["Socket"]["SocketMode"], 8) == 0o666 & ~settings["umask"]


@pytest.mark.parametrize("files", [
    {"gunicorn.service": "gunicorn.service"},
    # Installed as gunicorn.service: the name gunicorn.socket activates.
    {"gunicorn.socket": "gunicorn.socket", SOCKET_ACTIVATED: "gunicorn.service"},
], ids=["plain", "socket-activated"])
def test_systemd_units_verify(tmp_path, files):
    analyze = require_tool("systemd-analyze")
    units = tmp_path / "units"
    units.mkdir()
    app = str(tmp_path / "app")
    os.mkdir(app)
    for source, name in files.items():
        text = read_example(source)
        if name.endswith(".service"):
            text = deployed_command(text, app)
        (units / name).write_text(text)
    proc = subprocess.run([analyze, "verify", "--man=no"] + sorted(
        str(units / name) for name in files.values()),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=60)
    # Only complaints about our files count: verify also loads the host's units.
    ours = [line for line in proc.stdout.splitlines() if "gunicorn." in line]
    assert not ours, proc.stdout


@pytest.mark.parametrize("variant", ["example", "stock"])
def test_systemd_socket_activation(app_dir, started, variant):
    """gunicorn.socket's socket, bound here as systemd would, handed over with LISTEN_FDS
    and LISTEN_PID to gunicorn-socket-activated.service's ExecStart: gunicorn serves on it
    (not on config.py's bind; every supported gunicorn, 19.6.0 included, honours
    LISTEN_FDS), keeps it across restarts and leaves it to its owner at stop. The stock
    worker is the control: stock 19.6.0's UnixSocket.close() unlinks systemd's file."""
    socket_unit = unit("gunicorn.socket")["Socket"]
    service = unit(SOCKET_ACTIVATED)["Service"]
    sock_path = os.path.join(app_dir, "gunicorn.sock")
    assert socket_unit["ListenStream"] == SOCKET
    unused = os.path.join(app_dir, "unused.sock")
    install_app(app_dir, bind="unix:" + unused,
                worker_line="worker_class = 'sync'" if variant == "stock" else None)

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(sock_path)
        os.chmod(sock_path, int(socket_unit["SocketMode"], 8))
        os.chown(sock_path, -1, grp.getgrnam(socket_unit["SocketGroup"]).gr_gid)
        listener.listen(int(socket_unit["Backlog"]))
        inode = (os.lstat(sock_path).st_dev, os.lstat(sock_path).st_ino)
        argv = shlex.split(deployed_command(service["ExecStart"], app_dir))
        assert deployed_command(service["WorkingDirectory"], app_dir) == app_dir
        fd = listener.fileno()
        server = ExampleServer(
            app_dir, [sys.executable, "-c", SYSTEMD_WRAPPER, str(fd)] + argv, sock_path,
            pass_fds=(fd,))
        started.append(server)
        server.start()
        assert not os.path.exists(unused), "gunicorn bound config.py's socket itself"

        result = _load.run_load(sock_path, seconds=30.0, concurrency=4, stop=lambda: (
            server.restarts() >= 5 or not os.path.lexists(sock_path)))
        if variant == "stock":
            if STOCK_WORKERS_UNLINK:
                assert not os.path.lexists(sock_path), \
                    "control: stock 19.6.0 should unlink systemd's socket\n" + server.log()
                return
            server.signal(signal.SIGTERM)
            assert server.wait_exit(timeout=45) == 0, server.log()
            st = os.lstat(sock_path)
            assert (st.st_dev, st.st_ino) == inode
            return
        assert server.restarts() >= 5, server.log()
        assert result.failed == 0, (result.as_dict(), server.log())
        assert server.tracebacks() == 0, server.log()

        server.signal(signal.SIGTERM)
        assert server.wait_exit(timeout=45) == 0, server.log()  # see above: graceful_timeout
        st = os.lstat(sock_path)
        assert (st.st_dev, st.st_ino) == inode, "gunicorn removed systemd's socket"
        # systemd's listener is still there for the next start.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(sock_path)
        finally:
            probe.close()
    finally:
        listener.close()


# -- as the unit's user -----------------------------------------------------------------------

def portable_python(dest):
    """This interpreter, its standard library and the distributions the examples import,
    copied under ``dest`` where any user can read them: a pyenv Python under /root (mode
    0700) cannot be run by www-data. Returns (python, environment)."""
    base = sys.base_prefix
    ignore = shutil.ignore_patterns("test", "tests", "site-packages", "__pycache__",
                                    "idlelib", "tkinter", "turtledemo", "ensurepip",
                                    "lib2to3", "config-*", "*.a")
    stdlib = "python%d.%d" % sys.version_info[:2]
    shutil.copytree(os.path.join(base, "lib", stdlib), os.path.join(dest, "lib", stdlib),
                    ignore=ignore)
    for name in os.listdir(os.path.join(base, "lib")):  # a shared libpython, if any
        if name.startswith("libpython"):
            shutil.copy2(os.path.join(base, "lib", name), os.path.join(dest, "lib", name))
    os.makedirs(os.path.join(dest, "bin"))
    python = os.path.join(dest, "bin", "python3")
    shutil.copy2(os.path.realpath(sys.executable), python)
    site = os.path.join(dest, "site")
    os.makedirs(site)
    import importlib
    # gunicorn <= 20.x imports pkg_resources, whose newer releases load setuptools' vendored
    # packages; gunicorn >= 22 imports packaging.
    for module in ("gunicorn", "safe_gthread", "bottle", "packaging", "pkg_resources",
                   "setuptools"):
        try:
            origin = importlib.import_module(module).__file__
        except ImportError:
            continue
        if os.path.basename(origin) == "__init__.py":
            shutil.copytree(os.path.dirname(origin),
                            os.path.join(site, os.path.basename(os.path.dirname(origin))),
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, site)
    for base_dir, dirs, files in os.walk(dest):
        os.chmod(base_dir, 0o755)
        for name in files:
            path = os.path.join(base_dir, name)
            os.chmod(path, os.stat(path).st_mode | 0o444)
    env = dict(os.environ, PYTHONHOME=dest, PYTHONPATH=site, PYTHONDONTWRITEBYTECODE="1",
               LD_LIBRARY_PATH=os.path.join(dest, "lib"))
    return python, env


@pytest.mark.parametrize("group", ["example", "other"])
def test_examples_run_as_the_units_user(app_dir, started, group):
    """examples/config.py started the way gunicorn.service starts it: as its User= and
    Group=, in the /run/gunicorn its RuntimeDirectory= makes (owned by that user, mode
    0755), with nginx.conf in front where nginx is installed. The control is the group
    0.2.0 shipped, 'nogroup', which www-data is not in: gunicorn cannot give the socket
    that group and fails at bind, and systemd would restart it in a loop."""
    require_root()
    # setpriv execs gunicorn as the user (runuser would stay its parent and take the
    # signals meant for the master).
    setpriv = require_tool("setpriv")
    service = unit("gunicorn.service")["Service"]
    user, group_name = service["User"], service["Group"]
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        if os.environ.get("CI"):
            pytest.fail("the unit's user %s does not exist" % user)
        pytest.skip("no user %s on this machine" % user)
    root, app_dir = app_dir, os.path.join(app_dir, "app")  # /srv/app: read-only to the user
    python, env = portable_python(os.path.join(root, "py"))
    run_dir = os.path.join(root, "run")            # /run/gunicorn: RuntimeDirectory=
    os.mkdir(app_dir, 0o755)
    os.mkdir(run_dir, 0o755)
    os.chown(run_dir, account.pw_uid, grp.getgrnam(group_name).gr_gid)
    sock = os.path.join(run_dir, "gunicorn.sock")
    install_app(app_dir, bind="unix:" + sock,
                group_line="group = 'nogroup'" if group == "other" else None)
    config_path = os.path.join(app_dir, "config.py")
    with open(config_path) as fh:
        text = fh.read()
    with open(config_path, "w") as fh:  # the error log where the user may write it
        fh.write(replace(text, os.path.join(app_dir, "gunicorn.log"),
                         os.path.join(run_dir, "gunicorn.log"), count=1))
    argv = shlex.split(deployed_command(service["ExecStart"], app_dir))
    assert argv[1:] == ["-c", os.path.join(app_dir, "config.py"), "web:app"]
    command = [setpriv, "--reuid", user, "--regid", group_name, "--init-groups", "--",
               python, "-c",
               "from gunicorn.app.wsgiapp import run; run()"] + argv[1:]
    server = ExampleServer(app_dir, command, sock, env=env)
    server.log_path = os.path.join(run_dir, "gunicorn.log")
    started.append(server)
    if group == "other":
        server.start(wait=False)
        code = server.wait_exit(timeout=30)
        log = server.errorlog() + server.log()
        assert code != 0 and "ermission denied" in log, (code, log)
        return
    server.start()
    st = os.stat(sock)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (account.pw_uid, 0o770)
    assert grp.getgrgid(st.st_gid).gr_name == group_name
    address = sock
    nginx = _procs.find_executable("nginx")
    if nginx is None and os.environ.get("CI"):
        pytest.fail("nginx is not installed; .ci/run should have installed it")
    if nginx is not None:  # the proxy's workers run as www-data too: they may connect
        port = free_port()
        conf = os.path.join(root, "nginx.conf")
        with open(conf, "w") as fh:
            fh.write(nginx_config(root, sock, port))
        proxy = Proxy(root, [nginx, "-p", root, "-c", conf])
        started.append(proxy)
        proxy.start(port)
        address = ("127.0.0.1", port)
    assert _load.request(address)[2] == b"Hello World"
    result = load(address, server, restarts=3)
    assert server.restarts() >= 3, server.log()
    assert result.failed == 0, (result.as_dict(), server.log())
    assert server.tracebacks() == 0, server.log()
    server.signal(signal.SIGTERM)
    assert server.wait_exit(timeout=45) == 0, server.log()
    assert not os.path.lexists(sock)


# -- Kubernetes ------------------------------------------------------------------------------

def test_kubernetes_example_is_consistent_with_config_py():
    """No cluster here: the manifest is checked against config.py and the sizing rule of
    docs/settings.md instead of started."""
    yaml = pytest.importorskip("yaml")
    pod = yaml.safe_load(read_example("kubernetes.yaml"))["spec"]["template"]["spec"]
    settings, _ = settings_of(read_example("config.py"))
    assert pod["terminationGracePeriodSeconds"] > settings.get("graceful_timeout", 30)
    gunicorn, nginx = pod["containers"]
    socket_dir = os.path.dirname(settings["bind"][len("unix:"):])
    for container in (gunicorn, nginx):
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["socket"] == socket_dir
    assert grp.getgrnam(settings["group"]).gr_gid == gunicorn["securityContext"]["runAsGroup"]
    assert "server unix:%s/gunicorn.sock " % socket_dir in read_example("nginx.conf")
    command = gunicorn["command"][-1]
    assert command.split("; exec ")[1].split() == shlex.split(
        supervisor_program()["command"])[:3] + ["--worker-tmp-dir", "/dev/shm", "web:app"]
    env = {e["name"]: e["value"] for e in gunicorn["env"]}
    memory = int(env["SAFE_GTHREAD_MAX_WORKER_MEMORY"].rstrip("M"))
    limit = int(gunicorn["resources"]["limits"]["memory"].rstrip("Mi"))
    workers = settings["workers"] + int(env["SAFE_GTHREAD_MAX_RETIRING"])
    assert limit >= workers * memory * 1.15 + 30


# -- supervisor ------------------------------------------------------------------------------

def test_supervisor_program_matches_config_py():
    program = supervisor_program()
    argv = shlex.split(program["command"])
    assert os.path.basename(argv[0]) == "gunicorn"
    assert argv[1] == "-c" and os.path.basename(argv[2]) == "config.py"
    assert os.path.dirname(argv[2]) == program["directory"] == APP_DIR
    module, _, name = argv[3].partition(":")
    assert (module, name) == ("web", "app")
    assert os.path.exists(os.path.join(EXAMPLES, module + ".py"))
    assert program["stopsignal"] == "TERM"
    settings, _ = settings_of(read_example("config.py"))
    assert int(program["stopwaitsecs"]) > settings.get("graceful_timeout", 30)
    assert settings["daemon"] is False  # supervisor needs gunicorn in the foreground
    assert program["stopasgroup"] == "false"  # only the master gets TERM


def test_check_demo_runs_check_in_each_demo_cell(monkeypatch, tmp_path):
    """The quick start's first command, its plumbing against the matrix's real API: one
    wheel, each demo cell's venv, ``safe-gthread check`` there with the arguments given.
    (Run for real it builds two venvs: the README's quick start, tried from a fresh clone
    before each release.)"""
    import contextlib
    import inspect
    sys.path.insert(0, EXAMPLES)
    try:
        import check_demo
    finally:
        sys.path.remove(EXAMPLES)
    matrix = check_demo.matrix
    wheel = str(tmp_path / "safe_gthread-0-py3-none-any.whl")
    calls = []

    @contextlib.contextmanager
    def built_wheel(*args, **kwargs):
        inspect.signature(matrix.built_wheel).bind(*args, **kwargs)
        yield wheel

    def prepare(*args, **kwargs):
        inspect.signature(matrix.prepare).bind(*args, **kwargs)
        calls.append(("prepare",) + args)
        return str(tmp_path / ("venv-" + args[0]))

    monkeypatch.setattr(matrix, "built_wheel", built_wheel)
    monkeypatch.setattr(matrix, "prepare", prepare)
    monkeypatch.setattr(check_demo.subprocess, "call", lambda argv: calls.append(tuple(argv)) or 2)
    assert check_demo.main(["--seconds", "3"]) == 2  # the worst exit code of the checks
    expected = []
    for gunicorn, python in check_demo.DEMO_CELLS:
        assert (gunicorn, python) in matrix.CELLS  # the demo reuses the matrix's venvs
        expected += [("prepare", gunicorn, python, wheel),
                     (str(tmp_path / ("venv-" + gunicorn) / "bin" / "safe-gthread"),
                      "check", "--seconds", "3")]
    assert calls == expected
