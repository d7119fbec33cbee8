"""Drop the second copy of an inline ``<script>`` from every page.

Sphinx 7.4 emits an inline script twice when an extension adds it after the HTML builder is set up
(sphinx-togglebutton's ``togglebuttonSelector``, sphinx-thebe's ``const THEBE_JS_URL ...``): once from the
registry, where its empty filename is stored as ``''``, and once from the builder, as ``None``, so the two
do not compare equal. The second ``const`` declaration is a SyntaxError on every page of the book, which the
browser test (tests/test_book_browser.py) counts as a console error.
"""

from __future__ import annotations


def _dedupe(app, pagename, templatename, context, doctree):
    seen, kept = set(), []
    for script in context.get("script_files", []):
        filename = getattr(script, "filename", script) or ""
        attributes = getattr(script, "attributes", {})
        key = (filename, tuple(sorted((k, str(v)) for k, v in attributes.items() if k != "priority")))
        if key in seen:
            continue
        seen.add(key)
        kept.append(script)
    if "script_files" in context:
        context["script_files"][:] = kept


def setup(app):
    # After the theme and the other extensions have added their scripts to the page's context.
    app.connect("html-page-context", _dedupe, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
