"""The installed package, as users get it."""
import os

import safe_gthread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tests_run_against_the_installed_package_not_the_source_tree():
    package_dir = os.path.dirname(os.path.abspath(safe_gthread.__file__))
    assert package_dir != os.path.join(ROOT, "safe_gthread")
    assert os.path.basename(os.path.dirname(package_dir)) == "site-packages", package_dir


def test_public_names():
    assert sorted(safe_gthread.__all__) == ["Worker", "__version__", "configure", "guard"]
    assert sorted(safe_gthread.guard.__all__) == ["install", "installed", "uninstall"]
    assert callable(safe_gthread.guard.install) and callable(safe_gthread.guard.uninstall)


def test_version_matches_metadata():
    try:
        from importlib.metadata import version
    except ImportError:  # Python < 3.8
        from pkg_resources import get_distribution

        def version(name):
            return get_distribution(name).version
    assert safe_gthread.__version__ == version("safe-gthread")


def test_importing_the_worker_loads_none_of_the_check_tooling():
    # What ``gunicorn -k safe_gthread.Worker`` imports in production: the worker, the
    # guard and the runtime they need, never the check command or the test rig.
    import subprocess
    import sys
    code = ("import sys, safe_gthread; "
            "print(sorted(m for m in sys.modules if m.startswith('safe_gthread'))); "
            "print(sorted({k.__module__ for k in safe_gthread.Worker.__mro__}))")
    out = subprocess.check_output([sys.executable, "-c", code], cwd="/").decode()
    loaded, bases = out.splitlines()
    assert "safe_gthread.check" not in loaded, loaded
    # Of the retirements, only this gunicorn's (and what it builds on) is loaded.
    for name in ("legacy", "method_queue", "graceful"):
        module = "'safe_gthread._retire.%s'" % name
        assert (module in loaded) == (module in bases), (loaded, bases)
