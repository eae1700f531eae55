"""The HTTP API's routers (``service.main.create_app`` mounts them). Routes parse the request,
call ``service.runs`` / ``service.reads`` / ``service.submission`` and return API shapes
from ``service.api.models``; they run no queries and commit nothing themselves."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.security import HTTPBearer

from service.api import compare, datasets, presets, runs, smoke, sweeps, system

#: Documents the bearer token in OpenAPI (the check itself is ``middleware.AuthMiddleware``).
bearer_scheme = HTTPBearer(
    auto_error=False, description="MOEJOBS_API_TOKEN, when the server has one"
)


def routers() -> list[APIRouter]:
    """Every router of the API, protected ones carrying the bearer scheme for the docs."""
    protected = APIRouter(dependencies=[Depends(bearer_scheme)])
    protected.include_router(runs.router)
    protected.include_router(compare.router)  # issue 11: compare
    protected.include_router(datasets.router)
    protected.include_router(smoke.router)
    protected.include_router(presets.router)
    protected.include_router(sweeps.router)  # issue 11
    protected.include_router(system.protected_router)
    return [system.router, system.docs_router, protected]
