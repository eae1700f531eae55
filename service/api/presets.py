"""Presets: ``GET /presets`` lists the shipped ones (``configs/presets/<name>.yaml``) with the
layers each merges over the submitted documents (``service.config.presets``); the dashboard's
run editor starts from them."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service.api.errors import ApiError
from service.api.models import PresetPublic
from service.api.openapi import errors
from service.config.issues import ConfigError
from service.config.presets import list_presets, load_preset

router = APIRouter(tags=["presets"])


def _presets() -> list[PresetPublic]:
    out = []
    for name in list_presets():
        try:
            doc = load_preset(name)
        except ConfigError as error:
            raise ApiError(500, f"preset {name} cannot be read: {error}") from None
        out.append(PresetPublic.model_validate({"name": name, **doc}))
    return out


@router.get(
    "/presets", response_model=list[PresetPublic], summary="Shipped presets", responses=errors()
)
async def get_presets() -> list[PresetPublic]:
    """Each shipped preset's name and its ``train_config`` / ``model_config`` layers, by name.
    A preset is given to ``POST /runs`` by name; its values replace the submitted ones."""
    return await run_in_threadpool(_presets)
