"""Rendering the config templates in `files/` (Jinja2, strict: a missing variable is an
error). Pure: the command builders in `commands/` use it; uploading is `remote.put_template`."""
from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from .errors import DeployError

FILES_DIR = Path(__file__).resolve().parent.parent / "files"


@functools.lru_cache(maxsize=8)
def _environment(base_dir: str) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(base_dir),
        undefined=jinja2.StrictUndefined,  # a missing variable is an error, not ""
        keep_trailing_newline=True,
        autoescape=False,  # config files, not HTML
    )


def render_template(
    name: str, context: Mapping[str, Any], *, base_dir: str | Path | None = None
) -> str:
    """Render ``files/NAME`` (or ``base_dir/NAME``) with Jinja2."""
    base = str(Path(base_dir) if base_dir is not None else FILES_DIR)
    try:
        return _environment(base).get_template(name).render(**context)
    except jinja2.TemplateNotFound:
        raise DeployError(f"template {name!r} not found in {base}") from None
    except jinja2.UndefinedError as exc:
        raise DeployError(f"template {name!r}: {exc} (add it to the context)") from None
