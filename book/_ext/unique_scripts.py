"""Each script once per page.

sphinx-thebe adds its configuration script (``const THEBE_JS_URL = ...``) every time Sphinx reads
the documents, and a Jupyter Book build reads them twice, so every page declared the same
constants twice (once more with an empty file name) and the browser reported a SyntaxError. This extension drops repeated scripts
from each page's context, keeping the first of each.
"""


def _unique(scripts: list) -> list:
    seen, kept = set(), []
    for script in scripts:
        # The same file or body (an inline script's file is None or ""), whatever its priority.
        key = (getattr(script, "filename", str(script)) or "",
               tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(script)
    return kept


def _drop_repeated_scripts(app, pagename, templatename, context, doctree):
    if "script_files" in context:
        context["script_files"][:] = _unique(context["script_files"])


def setup(app):
    app.connect("html-page-context", _drop_repeated_scripts)
    return {"parallel_read_safe": True}
