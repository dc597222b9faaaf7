"""MkDocs hook: fill the API page from the package's docstrings and the changelog page
from CHANGELOG.md, at build time, without importing the package or gunicorn; and give a
page that declares ``lang: ja`` (front matter) its ``<html lang="ja">``.

In a page, a line ``::: safe_gthread.Worker`` (an object) or ``::: safe_gthread.guard``
(a module, with its public functions) becomes that object's documentation; a line
``<!-- include CHANGELOG.md -->`` becomes that file, minus its first heading.
"""
import ast
import os
import re

#: The documented objects: dotted name -> (source file, class or function name or None).
OBJECTS = {
    "safe_gthread": ("safe_gthread/__init__.py", None),
    "safe_gthread.Worker": ("safe_gthread/_worker.py", "Worker"),
    "safe_gthread.configure": ("safe_gthread/_settings.py", "configure"),
    "safe_gthread.guard": ("safe_gthread/guard.py", None),
}

_DIRECTIVE = re.compile(r"^::: *([\w.]+) *$", re.M)
_INCLUDE = re.compile(r"^<!-- include ([\w.]+) -->$", re.M)


def _root(config):
    return os.path.dirname(os.path.abspath(config["config_file_path"]))


def rst_to_markdown(text):
    """The little reStructuredText our docstrings use, as Markdown."""
    text = re.sub(r":(?:mod|class|func|meth|attr|data):`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    lines, out, in_literal = text.split("\n"), [], False
    for line in lines:
        if in_literal:
            if line.strip() and not line.startswith("    "):
                in_literal = False
                out.append("```")
                out.append("")
            else:
                out.append(line[4:])
                continue
        if line.rstrip().endswith("::"):
            stripped = line.rstrip()[:-1]
            out.append(stripped if stripped.strip() != ":" else "")
            out.append("")
            out.append("```python")
            in_literal = True
            continue
        out.append(line)
    if in_literal:
        while out and not out[-1].strip():
            out.pop()
        out.append("```")
    # Drop the blank line the literal block's opening left after the fence.
    return re.sub(r"```python\n\n", "```python\n", "\n".join(out))


def _signature(node, source):
    args = [a.arg for a in node.args.args]
    defaults = [ast.get_source_segment(source, d) or "..." for d in node.args.defaults]
    parts = []
    for index, name in enumerate(args):
        offset = index - (len(args) - len(defaults))
        parts.append("%s=%s" % (name, defaults[offset]) if offset >= 0 else name)
    return "(%s)" % ", ".join(parts)


def document(root, name, level=2):
    path, member = OBJECTS[name]
    with open(os.path.join(root, path), encoding="utf-8") as fh:
        source = fh.read()
    module = ast.parse(source)
    hashes = "#" * level
    if member is not None:
        node = next(n for n in module.body
                    if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == member)
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        return "%s `%s` {#%s}\n\n*%s*\n\n%s\n" % (
            hashes, name, name.replace(".", "-").lower(), kind,
            rst_to_markdown(ast.get_docstring(node) or ""))
    parts = ["%s `%s` {#%s}\n\n*module*\n\n%s\n" % (
        hashes, name, name.replace(".", "-").lower(),
        rst_to_markdown(ast.get_docstring(module) or ""))]
    public = None
    for node in module.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            public = ast.literal_eval(node.value)
    for node in module.body:
        if isinstance(node, ast.FunctionDef) and public is not None and node.name in public:
            parts.append("%s# `%s.%s%s`\n\n%s\n" % (
                hashes, name, node.name, _signature(node, source),
                rst_to_markdown(ast.get_docstring(node) or "")))
    return "\n".join(parts)


def on_page_markdown(markdown, page, config, files):
    root = _root(config)

    def api(match):
        return document(root, match.group(1))

    def include(match):
        path = os.path.join(root, match.group(1))
        if not os.path.exists(path):
            return "*%s is not written yet.*" % match.group(1)
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        # The page has its own title; the file's headings move one level down.
        text = re.sub(r"\A# .*\n", "", text)
        return re.sub(r"^(#+) ", r"#\1 ", text, flags=re.M)

    markdown = _DIRECTIVE.sub(api, markdown)
    return _INCLUDE.sub(include, markdown)


_HTML_LANG = re.compile(r'<html lang="[^"]*"')


def on_post_page(output, page, config):
    """The theme writes the site's locale into every page's <html lang>: a page whose front
    matter says otherwise (``lang: ja``) gets its own, for screen readers, fonts and
    search engines."""
    lang = page.meta.get("lang") if page.meta else None
    if not lang:
        return output
    return _HTML_LANG.sub('<html lang="%s"' % lang, output, count=1)
