"""The installed package, as users get it."""
import os

import safe_gthread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tests_run_against_the_installed_package_not_the_source_tree():
    package_dir = os.path.dirname(os.path.abspath(safe_gthread.__file__))
    assert package_dir != os.path.join(ROOT, "safe_gthread")
    assert os.path.basename(os.path.dirname(package_dir)) == "site-packages", package_dir


def test_public_names():
    assert sorted(safe_gthread.__all__) == ["Worker", "__version__", "guard"]
    assert callable(safe_gthread.guard.install) and callable(safe_gthread.guard.uninstall)


def test_version_matches_metadata():
    try:
        from importlib.metadata import version
    except ImportError:  # Python < 3.8
        from pkg_resources import get_distribution

        def version(name):
            return get_distribution(name).version
    assert safe_gthread.__version__ == version("safe-gthread")
