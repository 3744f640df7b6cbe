"""MkDocs hook (mkdocs.yml ``hooks:``): kdedge's docstrings cross-reference in Sphinx's roles.

``:func:`~kdedge.data.spec.stratified_rows``` reaches the page as ``:func:<code>~kdedge...</code>``;
this renders it as the code name alone (the last part after ``~``, as Sphinx does), without the role.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):<code>(~?)([^<]+)</code>")


def on_page_content(html: str, **_: object) -> str:
    return _ROLE.sub(lambda m: f"<code>{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}</code>", html)
