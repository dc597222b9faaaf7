"""The documentation site: it builds strictly, every config it shows is a file under
examples/ (which tests/test_examples.py starts for real), the Japanese pages keep
step with the English ones, and the API page carries the public docstrings."""
import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
EXAMPLES = os.path.join(ROOT, "examples")

#: English pages that have a Japanese counterpart under docs/ja/ with the same code.
TRANSLATED = ["index.md", "install.md", "deploy.md", "deploying.md", "upgrading.md",
              "troubleshooting.md", "reuse-port.md", "rollout.md", "settings.md",
              "lifecycle.md", "api.md", "mold.md"]

#: Languages of whole configuration files: a block in one of these must be a file
#: under examples/, marked ``<!-- examples/NAME -->`` on the line before it.
CONFIG_LANGUAGES = {"nginx", "yaml", "ini", "conf", "systemd"}

_BLOCK = re.compile(r"^```([\w-]*)\n(.*?)^```$", re.M | re.S)
_MARKED = re.compile(r"<!-- (examples/[\w.-]+) -->\n```[\w-]*\n(.*?)^```$", re.M | re.S)


def pages():
    for base, dirs, files in os.walk(DOCS):
        dirs[:] = [d for d in dirs if not d.startswith("_")]
        for name in sorted(files):
            if name.endswith(".md"):
                yield os.path.relpath(os.path.join(base, name), DOCS)


def read(*parts):
    with open(os.path.join(*parts), encoding="utf-8") as fh:
        return fh.read()


def code_blocks(text):
    return [(lang, body) for lang, body in _BLOCK.findall(text)]


_COMMENT = re.compile(r"(^|\s)#\s.*$", re.M)


def code_without_comments(text):
    """The code blocks with their ``# comments`` taken out: a translation may translate
    the comments, never the code."""
    return [(lang, _COMMENT.sub("", body).rstrip()) for lang, body in code_blocks(text)]


def mkdocs():
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        pytest.skip("mkdocs is not installed (the matrix installs it on Python >= 3.8 only)")
    return [sys.executable, "-m", "mkdocs"]


def test_site_builds_strictly(tmp_path):
    command = mkdocs()
    site = tmp_path / "site"
    proc = subprocess.run(command + ["build", "--strict", "-f", os.path.join(ROOT, "mkdocs.yml"),
                                     "-d", str(site)],
                          cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=120)
    assert proc.returncode == 0, proc.stdout
    for page in ("index.html", "install/index.html", "deploy/index.html", "api/index.html",
                 "upgrading/index.html", "troubleshooting/index.html", "changelog/index.html",
                 "benchmarks/index.html", "lifecycle/index.html",
                 "ja/install/index.html", "ja/deploy/index.html",
                 "ja/upgrading/index.html", "ja/troubleshooting/index.html"):
        assert (site / page).exists(), page
    # Japanese pages say so (their front matter, applied by the docs hook), English ones
    # keep the theme's; the search index covers both languages.
    for page in pages():
        html_text = (site / page[:-len(".md")].replace("index", "")
                     / "index.html").read_text(encoding="utf-8")
        lang = "ja" if page.startswith("ja" + os.sep) else "en"
        assert '<html lang="%s"' % lang in html_text, page
    import json
    search = json.loads((site / "search" / "search_index.json").read_text(encoding="utf-8"))
    assert search["config"]["lang"] == ["en", "ja"]
    assert any(doc["location"].startswith("ja/") and "ソケット" in doc["text"]
               for doc in search["docs"])
    api = _text((site / "api" / "index.html").read_text(encoding="utf-8"))
    # Generated from the source: the first line of each public docstring is on the page.
    for path, member in (("__init__.py", None), ("_worker.py", "Worker"),
                         ("guard.py", None), ("guard.py", "install"),
                         ("guard.py", "uninstall")):
        first = _first_line(os.path.join(ROOT, "safe_gthread", path), member)
        assert first in api, (path, member, first)
    changelog = (site / "changelog" / "index.html").read_text(encoding="utf-8")
    if os.path.exists(os.path.join(ROOT, "CHANGELOG.md")):
        # The page is the CHANGELOG itself: its newest entry is there.
        with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as fh:
            newest = re.search(r"^## \[([^\]]+)\]", fh.read(), re.M).group(1)
        assert newest in changelog, newest


def _text(html_text):
    import html
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", html_text)))


def _first_line(path, member):
    with open(path, encoding="utf-8") as fh:
        module = ast.parse(fh.read())
    node = module if member is None else next(
        n for n in module.body
        if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == member)
    line = ast.get_docstring(node).split("\n")[0]
    return re.sub(r":\w+:`([^`]+)`", r"\1", line).replace("``", "")


@pytest.mark.parametrize("page", list(pages()))
def test_every_config_shown_is_an_example_file(page):
    text = read(DOCS, page)
    for name, body in _MARKED.findall(text):
        assert os.path.exists(os.path.join(ROOT, name)), (page, name)
        assert body == read(ROOT, name), \
            "%s shows %s, but differs from the file: copy the file into the page" % (page, name)
    marked = {body for _, body in _MARKED.findall(text)}
    for lang, body in code_blocks(text):
        whole_config = lang in CONFIG_LANGUAGES or (
            lang == "python" and re.search(r"^bind = ", body, re.M))
        if whole_config:
            assert body in marked, "%s shows a %s config that is not a file under examples/:" \
                "\n%s" % (page, lang, body[:300])


def test_every_example_file_is_shown_in_the_deploy_guides():
    shown = set(name for name, _ in _MARKED.findall(read(DOCS, "deploy.md")))
    for name in os.listdir(EXAMPLES):
        if name.endswith((".py", ".conf", ".service", ".socket")) and name != "check_demo.py":
            assert "examples/" + name in shown, name


@pytest.mark.parametrize("page", TRANSLATED)
def test_japanese_page_keeps_step(page):
    english = read(DOCS, page)
    japanese_path = os.path.join(DOCS, "ja", page)
    assert os.path.exists(japanese_path), "docs/ja/%s is missing" % page
    japanese = read(japanese_path)
    # Code is the same (comments may be translated); ``text`` blocks (diagrams) may be
    # translated, but not dropped.
    assert [b for b in code_without_comments(japanese) if b[0] != "text"] == \
        [b for b in code_without_comments(english) if b[0] != "text"], \
        "docs/ja/%s: its code blocks differ from docs/%s" % (page, page)
    assert [b[0] for b in code_blocks(japanese)] == [b[0] for b in code_blocks(english)]
    # The same sections, in the same order (admonitions and headings count alike).
    assert len(re.findall(r"^#+ ", japanese, re.M)) == len(re.findall(r"^#+ ", english, re.M))
    assert japanese.count("!!! ") == english.count("!!! ")


def test_japanese_pages_declare_their_language():
    for page in pages():
        if page.startswith("ja" + os.sep):
            assert read(DOCS, page).startswith("---\nlang: ja\n---\n"), page


def test_readme_links_the_translation_the_docs_and_the_upstream_issue():
    readme = read(ROOT, "README.md")
    for target in ["README.ja.md", "docs/index.md", "docs/install.md", "docs/deploy.md",
                   "docs/upgrading.md", "docs/troubleshooting.md",
                   "https://github.com/benoitc/gunicorn/issues/1298"]:
        assert "](%s" % target in readme or "]: %s" % target in readme, target
    # Every relative link in either README names a file that exists.
    for name in ("README.md", "README.ja.md"):
        for target in re.findall(r"\]\(((?:docs/|README)[^)#]*)", read(ROOT, name)):
            assert os.path.exists(os.path.join(ROOT, target)), (name, target)


def test_readme_ja_keeps_step_with_readme():
    readme = read(ROOT, "README.md")
    readme_ja = read(ROOT, "README.ja.md")
    assert "README.md" in readme_ja
    english_blocks = code_blocks(readme)
    for block in code_blocks(readme_ja):
        assert block in english_blocks, "README.ja.md shows a block README.md does not:\n%s" \
            % (block[1],)
    assert len(code_blocks(readme_ja)) == len(english_blocks)
    # The same sections: one README is not to have what the other lacks.
    heading = re.compile(r"^#+ ", re.M)
    assert [len(h) for h in heading.findall(readme_ja)] == \
        [len(h) for h in heading.findall(readme)]


def test_nav_lists_every_page():
    text = read(ROOT, "mkdocs.yml")
    for page in pages():
        assert ": %s\n" % page in text, "%s is not in mkdocs.yml's nav" % page
