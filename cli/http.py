"""The HTTP client of the moejobs API: requests, answers decoded with the API's own models
(``service.api.models``, ``service.api.openapi.ErrorBody``), and every failure a user can cause
or fix turned into a :class:`ClientError`. It prints nothing (:mod:`cli.runs` does).

The base URL is the one given, else the settings' ``url`` (``MOEJOBS_URL``), else
``http://HOST:PORT`` of ``MOEJOBS_HOST``/``MOEJOBS_PORT`` (a wildcard host meaning this machine);
the token is the one given, else the settings' ``API_TOKEN``. ``service.settings`` stays the only
reader of environment variables.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from pydantic import TypeAdapter, ValidationError

from service.api.models import (
    CheckpointPublic,
    Comparison,
    EngineEventPublic,
    MetricPage,
    RunCreated,
    RunPage,
    RunPublic,
    SmokeTestPublic,
    SweepPage,
    SweepPublic,
)
from service.api.openapi import ErrorBody

if TYPE_CHECKING:
    from service.settings import Settings

#: Default timeout of one request (seconds); archive downloads and ``?wait=`` get more.
REQUEST_TIMEOUT = 30.0

_T = TypeVar("_T")


class ClientError(Exception):
    """A failure to report in one line: ``str(error)`` is the message, ``.exit_code`` the
    command's exit code (1, or 2 for an invalid config), ``.status_code`` the HTTP status when
    the server answered (else None), ``.body`` the API's error body when the answer was one
    (else None)."""

    def __init__(
        self,
        message: str,
        exit_code: int = 1,
        *,
        status_code: int | None = None,
        body: ErrorBody | None = None,
    ):
        super().__init__(message)
        self.exit_code = exit_code
        self.status_code = status_code
        self.body = body


# -- settings -------------------------------------------------------------------------------------


def default_base_url() -> str:
    """The API's URL from the settings: their ``url`` (``MOEJOBS_URL``) when set, else
    ``http://HOST:PORT`` of ``MOEJOBS_HOST``/``MOEJOBS_PORT`` with a wildcard host (0.0.0.0,
    ::) replaced by 127.0.0.1. Raises ClientError when the settings themselves are invalid."""
    settings = _settings()
    if settings.url:
        return str(settings.url).rstrip("/")
    host = settings.host.strip()
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def default_token() -> str | None:
    """The settings' API token (``MOEJOBS_API_TOKEN``), or None."""
    token = _settings().api_token
    return token.get_secret_value() if token is not None else None


def _settings() -> Settings:
    """The process's settings. Raises ClientError (exit code 2) whose message has one line per
    problem, each naming the MOEJOBS_* variable (``MOEJOBS_PORT: expected an integer, got
    'abc'``); the lines after the first start with ``error: `` as the commands print the first."""
    from pydantic_settings import SettingsError

    from service.settings import InvalidSettingsError, UnsafeSettingsError, get_settings

    try:
        return get_settings()
    except (ValidationError, UnsafeSettingsError, SettingsError) as error:
        lines = InvalidSettingsError.from_exception(error).lines()
        raise ClientError("\nerror: ".join(lines), exit_code=2) from None


# -- error bodies ---------------------------------------------------------------------------------


def field_errors(body: ErrorBody) -> list[str]:
    """The lines to print for a 422: one ``path: message`` per entry of ``body.errors`` (its
    ``message`` alone when it has none). A leading ``"body"`` is dropped from the location
    (``["body", "train_config", "train", "micro_batch_size"]`` prints as
    ``train_config.train.micro_batch_size``); list indices print as ``[0]``."""
    if not body.errors:
        return [body.message]
    lines = []
    for error in body.errors:
        loc = list(error.loc)
        if loc and loc[0] == "body":
            loc = loc[1:]
        path = ""
        for part in loc:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        lines.append(f"{path}: {error.msg}" if path else error.msg)
    return lines


def _error_body(response: httpx.Response) -> tuple[ErrorBody | None, str]:
    """The API's error body of ``response`` (None when it is not one: a proxy's page, say) and
    the text to quote: the body's ``message``, else the first 500 characters of the answer."""
    try:
        raw: Any = response.json()
    except (ValueError, httpx.ResponseNotRead):
        try:
            text = response.text
        except httpx.ResponseNotRead:
            text = response.read().decode(errors="replace")
        return None, text.strip()[:500]
    try:
        body = ErrorBody.model_validate(raw)
    except ValidationError:
        return None, raw if isinstance(raw, str) else json.dumps(raw)
    return body, body.message


def raise_for_status(client: httpx.Client, response: httpx.Response, what: str = "") -> None:
    """Raise the ClientError of an error answer (status >= 400; read already when streamed);
    ``what`` (``"run ID"``) names what a 404 did not find."""
    code = response.status_code
    if code < 400:
        return
    body, detail = _error_body(response)
    if code == 401:
        sent = "Authorization" in client.headers
        raise ClientError(
            f"{client.base_url} rejected the API token"
            if sent
            else f"{client.base_url} needs an API token: pass --token or set MOEJOBS_API_TOKEN",
            status_code=code,
            body=body,
        )
    if code == 403:
        if body is not None and body.code == "invalid_token":
            raise ClientError(
                f"{client.base_url} rejected the API token (check --token or MOEJOBS_API_TOKEN)",
                status_code=code,
                body=body,
            )
        raise ClientError(f"forbidden: {detail}", status_code=code, body=body)
    if code == 404:
        raise ClientError(
            f"not found: {what or response.request.url.path}"
            + (f" ({detail})" if detail and what else ""),
            status_code=code,
            body=body,
        )
    if code == 422:
        lines = field_errors(body) if body is not None else [detail]
        raise ClientError(
            "invalid request:\n  " + "\n  ".join(lines), exit_code=2, status_code=code, body=body
        )
    if code == 409:
        raise ClientError(f"conflict: {detail}", status_code=code, body=body)
    raise ClientError(
        f"server error {code} on {response.request.method} {response.request.url.path}: {detail}",
        status_code=code,
        body=body,
    )


def _decode(response: httpx.Response, shape: type[_T] | TypeAdapter[_T]) -> _T:
    """The JSON of a 2xx ``response`` as ``shape`` (a pydantic model or a TypeAdapter)."""
    try:
        raw = response.json()
    except ValueError:
        raise ClientError(
            f"{response.request.url} answered {response.status_code} with "
            f"something that is not JSON"
        ) from None
    adapter = shape if isinstance(shape, TypeAdapter) else TypeAdapter(shape)
    try:
        return adapter.validate_python(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the body"
        raise ClientError(
            f"{response.request.url} answered {response.status_code} with an unexpected "
            f"shape ({where}: {first['msg']}); is the server another version of moejobs?"
        ) from None


def run_path(run_id: str | uuid.UUID) -> str:
    """``/runs/ID``. Raises ClientError when ``run_id`` is not a UUID."""
    text = str(run_id).strip()
    try:
        uuid.UUID(text)
    except ValueError:
        raise ClientError(
            f"{text!r} is not a run id (a UUID like 3f2b6c1e-8a4d-4e7f-9c0a-1b2c3d4e5f60)"
        ) from None
    return f"/runs/{text}"


_CHECKPOINTS = TypeAdapter(list[CheckpointPublic])
_ENGINE_EVENTS = TypeAdapter(list[EngineEventPublic])


# -- the client -----------------------------------------------------------------------------------


def _sweep_id(sweep_id: str) -> uuid.UUID:
    """``sweep_id`` as a UUID; ClientError for anything else (never sent as a path)."""
    try:
        return uuid.UUID(str(sweep_id))
    except ValueError:
        raise ClientError(f"not a sweep id: {sweep_id!r} (expected a UUID)") from None


class Api:
    """One connection to the API; use as a context manager. Every method sends one request
    and returns the decoded answer, or raises ClientError: server down or too slow, 401/403
    (token), 404 (``not found: WHAT``), 409, 422 (exit code 2, one line per field), 5xx, or an
    answer of another shape."""

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        timeout: float | httpx.Timeout = REQUEST_TIMEOUT,
    ):
        base = (base_url or default_base_url()).rstrip("/")
        if not base.startswith(("http://", "https://")):
            base = "http://" + base
        if token is None:
            token = default_token()
        headers = {"Accept": "application/json", "User-Agent": "moejobs-client"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.Client(base_url=base, headers=headers, timeout=timeout)

    @property
    def base_url(self) -> httpx.URL:
        return self.http.base_url

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def request(self, method: str, path: str, *, what: str = "", **kwargs: Any) -> httpx.Response:
        """Send one request; returns a 2xx response, raises ClientError otherwise."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise ClientError(self._refused()) from None
        except httpx.TimeoutException:
            raise ClientError(f"{self.base_url} did not answer {method} {path} in time") from None
        except httpx.HTTPError as error:
            raise ClientError(f"{method} {self.base_url}{path} failed: {error}") from None
        raise_for_status(self.http, response, what)
        return response

    def _refused(self) -> str:
        return (
            f"cannot connect to {self.base_url}: connection refused "
            f"(is the server running? set --url or MOEJOBS_URL)"
        )

    # -- runs

    def create_run(self, body: dict[str, Any], idempotency_key: str) -> RunCreated:
        """``POST /runs`` with ``body`` (``service.api.models.RunCreate``'s fields)."""
        headers = {"Idempotency-Key": idempotency_key}
        return _decode(self.request("POST", "/runs", json=body, headers=headers), RunCreated)

    def list_runs(self, **params: Any) -> RunPage:
        """``GET /runs`` with the query ``params`` whose value is not None."""
        query = {k: v for k, v in params.items() if v is not None}
        return _decode(self.request("GET", "/runs", params=query), RunPage)

    def get_run(self, run_id: str | uuid.UUID) -> RunPublic:
        return _decode(self.request("GET", run_path(run_id), what=f"run {run_id}"), RunPublic)

    def cancel_run(self, run_id: str | uuid.UUID) -> RunPublic:
        path = f"{run_path(run_id)}/cancel"
        return _decode(self.request("POST", path, what=f"run {run_id}"), RunPublic)

    def metrics(self, run_id: str | uuid.UUID, **params: Any) -> MetricPage:
        """``GET /runs/ID/metrics`` (``after_step``, ``limit``, ``max_points``)."""
        path = f"{run_path(run_id)}/metrics"
        return _decode(self.request("GET", path, what=f"run {run_id}", params=params), MetricPage)

    def engine_events(self, run_id: str | uuid.UUID) -> list[EngineEventPublic]:
        path = f"{run_path(run_id)}/engine-events"
        return _decode(
            self.request("GET", path, what=f"run {run_id}'s engine events"), _ENGINE_EVENTS
        )

    def checkpoints(self, run_id: str | uuid.UUID) -> list[CheckpointPublic]:
        path = f"{run_path(run_id)}/checkpoints"
        return _decode(self.request("GET", path, what=f"run {run_id}"), _CHECKPOINTS)

    @contextmanager
    def archive(
        self,
        run_id: str | uuid.UUID,
        ref: str,
        what: str,
        params: dict[str, str] | None = None,
    ) -> Iterator[httpx.Response]:
        """The streamed tar of checkpoint ``ref`` (a step number or ``final``) of the run, open
        while the ``with`` block reads it; ``params``: the archive's query (``include``,
        ``format``). Raises ClientError for an error answer (404: ``not
        found: WHAT``, its ``body.code`` saying which: ``run_not_found``,
        ``checkpoint_not_found``) and when the transfer fails or stalls, also while the block
        reads."""
        path = f"{run_path(run_id)}/checkpoints/{ref}/archive"
        try:
            with self.http.stream(
                "GET", path, params=params or None, headers={"Accept": "application/x-tar"}
            ) as response:
                if response.status_code >= 400:
                    response.read()
                raise_for_status(self.http, response, what)
                yield response
        except httpx.ConnectError:
            raise ClientError(self._refused()) from None
        except httpx.TimeoutException:
            raise ClientError(f"the download from {self.base_url} stalled") from None
        except httpx.HTTPError as error:
            raise ClientError(f"download from {self.base_url} failed: {error}") from None

    # -- tags, notes, delete, logs, compare (issue 11: compare)

    def patch_run(self, run_id: str | uuid.UUID, body: dict[str, Any]) -> RunPublic:
        """``PATCH /runs/ID`` with ``body`` (``tags``, ``add_tags``, ``remove_tags``, ``note``)."""
        response = self.request("PATCH", run_path(run_id), what=f"run {run_id}", json=body)
        return _decode(response, RunPublic)

    def delete_run(self, run_id: str | uuid.UUID) -> None:
        """``DELETE /runs/ID`` (409 ClientError while the run is queued or running)."""
        self.request("DELETE", run_path(run_id), what=f"run {run_id}")

    def logs(
        self, run_id: str | uuid.UUID, *, tail: int = 200, after_byte: int | None = None
    ) -> tuple[str, int | None]:
        """``GET /runs/ID/logs``: the last ``tail`` lines, or with ``after_byte`` the whole
        lines written after that offset; and the offset to pass next (the ``X-Log-Offset``
        header; None from a server without it)."""
        params: dict[str, Any] = {"tail": tail}
        if after_byte is not None:
            params["after_byte"] = after_byte
        response = self.request(
            "GET",
            f"{run_path(run_id)}/logs",
            what=f"run {run_id}",
            params=params,
            headers={"Accept": "text/plain"},
        )
        offset = response.headers.get("x-log-offset")
        return response.text, int(offset) if offset and offset.isdigit() else None

    def compare(self, run_ids: list[str]) -> Comparison:
        """``GET /compare?runs=ID,ID,...``."""
        for run_id in run_ids:
            run_path(run_id)  # a ClientError naming a malformed id
        response = self.request("GET", "/compare", params={"runs": ",".join(run_ids)})
        return _decode(response, Comparison)

    # -- sweeps (issue 11)

    def create_sweep(self, body: dict[str, Any]) -> SweepPublic:
        """``POST /sweeps`` with a sweep document (README "Sweeps")."""
        return _decode(self.request("POST", "/sweeps", json=body), SweepPublic)

    def list_sweeps(self, limit: int = 100) -> SweepPage:
        """``GET /sweeps``: the newest sweeps first, without their trials."""
        return _decode(self.request("GET", "/sweeps", params={"limit": limit}), SweepPage)

    def get_sweep(self, sweep_id: str) -> SweepPublic:
        path = f"/sweeps/{_sweep_id(sweep_id)}"
        return _decode(self.request("GET", path, what=f"sweep {sweep_id}"), SweepPublic)

    def cancel_sweep(self, sweep_id: str) -> SweepPublic:
        path = f"/sweeps/{_sweep_id(sweep_id)}/cancel"
        return _decode(self.request("POST", path, what=f"sweep {sweep_id}"), SweepPublic)

    # -- smoke test

    def start_smoke_test(self) -> SmokeTestPublic:
        """``POST /smoke-test``; a 409 ClientError's ``body`` carries the running one's
        ``run_id`` (:func:`running_smoke_test`)."""
        return _decode(self.request("POST", "/smoke-test"), SmokeTestPublic)

    def smoke_test(self, test_id: str, wait: int = 0) -> SmokeTestPublic:
        """``GET /smoke-test/ID?wait=S``: the verdict, once known or after ``wait`` seconds."""
        response = self.request(
            "GET", f"/smoke-test/{test_id}", params={"wait": wait}, what=f"smoke test {test_id}"
        )
        return _decode(response, SmokeTestPublic)


def running_smoke_test(error: ClientError) -> str | None:
    """The id of the smoke test that made ``POST /smoke-test`` answer 409 (the error body's
    ``run_id``), else None."""
    if error.status_code != 409 or error.body is None:
        return None
    run_id = (error.body.model_extra or {}).get("run_id")
    return str(run_id) if run_id else None
