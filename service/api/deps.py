"""FastAPI dependencies: the settings, database and Celery app built at start-up
(``service.main.create_app``'s lifespan puts them on ``app.state``)."""
from __future__ import annotations

from collections.abc import Iterator

from celery import Celery
from fastapi import Request
from sqlmodel import Session

from service.db import Database
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings


def get_database(request: Request) -> Database:
    return request.app.state.db


def get_session(request: Request) -> Iterator[Session]:
    """A session for one request (closed afterwards; commits happen in ``service.runs``)."""
    with request.app.state.db.session() as session:
        yield session


def get_celery(request: Request) -> Celery:
    return request.app.state.celery
