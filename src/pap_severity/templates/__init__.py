"""The HTML pages' Jinja2 templates (`*.html.j2` in this folder) and the one environment that renders them.

Autoescape is on: every value a page shows is escaped unless a template marks it safe,
and undefined names raise instead of rendering blank. Pages are self-contained (inline
style, images as data: URIs), so a report folder can be moved or mailed as it is.
"""

from __future__ import annotations

import base64
import math
import numbers
from functools import cache

from jinja2 import Environment, PackageLoader, StrictUndefined


def number(value, spec: str = ".3f", missing: str = "n/a") -> str:
    """A number formatted with `spec`; None, NaN (and non-numbers) as `missing`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(float(value)):
        return missing
    return format(value, spec)


def png_data_uri(png: bytes) -> str:
    """PNG bytes as a data: URI for an <img src>."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@cache
def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("pap_severity", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["number"] = number
    env.filters["png_data_uri"] = png_data_uri
    return env


def render(template: str, **context) -> str:
    """The page `template` (a file name in this folder) filled with `context`."""
    return environment().get_template(template).render(**context)
