"""Files the project ships beside its Python packages: ``configs/``, ``migrations/`` and
``alembic.ini``.

In a source checkout (``uv sync``, the Docker images) they sit at the repository root. A wheel
(``uv build``, ``pip install moejobs``) carries them inside the ``service`` package under
``service/_bundled/`` (``[tool.hatch.build.targets.wheel.force-include]`` in pyproject.toml),
because a wheel may only install packages. :func:`project_path` finds either.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["project_path"]

_BUNDLED = Path(__file__).resolve().parent / "_bundled"
_CHECKOUT = Path(__file__).resolve().parents[1]


def project_path(name: str) -> Path:
    """The shipped file or folder ``name`` (``"configs"``, ``"migrations"``, ``"alembic.ini"``).

    The copy bundled in an installed wheel comes first, so an unrelated top-level folder of the
    same name in site-packages is never picked up; otherwise the repository root's. The path is
    returned even when it does not exist (the caller's open names it in its error)."""
    bundled = _BUNDLED / name
    return bundled if bundled.exists() else _CHECKOUT / name
