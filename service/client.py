"""HTTP client of the moejobs API, behind the ``moejobs submit/runs/status/cancel/download/
smoke-test`` commands. Torch-free: it imports only httpx, tqdm and the config loader.

Two layers:

- functions (:func:`submit`, :func:`list_runs`, :func:`get_run`, :func:`status`, :func:`cancel`,
  :func:`download`, :func:`smoke_test`) that talk to the API, print progress to ``out`` and
  return the decoded JSON; they raise :class:`ClientError` (a one-line message and the exit code
  to use) for every failure a user can cause or fix: server down, 401, 404, 409, 422, 5xx.
- ``cmd_*`` functions taking an ``argparse.Namespace`` (registered by
  :func:`add_client_commands`) that print ``error: <message>`` on stderr and return the exit
  code: 0 ok, 1 failure (server unreachable, run failed, not found, ...), 2 invalid config (a 422).

The base URL is the ``--url`` argument, else ``http://HOST:PORT`` of the settings
(``MOEJOBS_HOST``/``MOEJOBS_PORT``, a wildcard host meaning this machine); the token is
``--token``, else the settings' ``API_TOKEN``. ``service.settings`` stays the only reader of
environment variables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx

#: Run statuses after which nothing changes (service.models.TERMINAL_STATUSES, spelled out
#: so this module does not import SQLModel).
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})

#: Seconds between polls of ``status --follow``.
POLL_SECONDS = 2.0

#: Default timeout of one request (seconds); archive downloads and ``?wait=`` get more.
REQUEST_TIMEOUT = 30.0


class ClientError(Exception):
    """A failure to report in one line: ``str(error)`` is the message, ``.exit_code`` the
    command's exit code (1, or 2 for an invalid config), ``.status_code`` the HTTP status when
    the server answered (else None), ``.body`` the decoded error body when there was one."""

    def __init__(
        self, message: str, exit_code: int = 1, *, status_code: int | None = None, body: Any = None
    ):
        super().__init__(message)
        self.exit_code = exit_code
        self.status_code = status_code
        self.body = body


# -- settings -------------------------------------------------------------------------------------


def default_base_url() -> str:
    """The API's URL from the settings: their ``url`` field when the settings have one (the
    ``MOEJOBS_URL`` variable), else ``http://HOST:PORT`` of ``MOEJOBS_HOST``/``MOEJOBS_PORT``
    with a wildcard host (0.0.0.0, ::) replaced by 127.0.0.1. Raises ClientError when the
    settings themselves are invalid."""
    settings = _settings()
    url = getattr(settings, "url", None) or getattr(settings, "api_url", None)
    if url:
        return str(url).rstrip("/")
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


def _settings():
    """The process's settings. Raises ClientError (exit code 2) whose message has one line per
    problem, each naming the MOEJOBS_* variable (``MOEJOBS_PORT: expected an integer, got
    'abc'``); the lines after the first start with ``error: `` as the commands print the first."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from service.settings import InvalidSettingsError, UnsafeSettingsError, get_settings

    try:
        return get_settings()
    except (ValidationError, UnsafeSettingsError, SettingsError) as error:
        lines = InvalidSettingsError.from_exception(error).lines()
        raise ClientError("\nerror: ".join(lines), exit_code=2) from None


# -- HTTP -----------------------------------------------------------------------------------------


def _client(
    base_url: str | None, token: str | None, timeout: float = REQUEST_TIMEOUT
) -> httpx.Client:
    base = (base_url or default_base_url()).rstrip("/")
    if not base.startswith(("http://", "https://")):
        base = "http://" + base
    if token is None:
        token = default_token()
    headers = {"Accept": "application/json", "User-Agent": "moejobs-client"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=base, headers=headers, timeout=timeout)


def _detail(body: Any) -> str:
    """A readable message from an error body (FastAPI's ``{"detail": ...}`` or other JSON)."""
    if isinstance(body, dict):
        detail = body.get("detail", body.get("message", body.get("error")))
        if detail is None:
            return json.dumps(body)
        body = detail
    if isinstance(body, dict):
        message = body.get("message") or body.get("msg") or body.get("detail")
        return str(message) if message is not None else json.dumps(body)
    if isinstance(body, list):
        return "; ".join(_detail(item) if not isinstance(item, str) else item for item in body)
    return str(body)


def field_errors(body: Any) -> list[str]:
    """The lines to print for a 422 body: one ``path: message`` per bad field.

    Accepts FastAPI's ``{"detail": [{"loc": [...], "msg": ...}]}`` and the ``{"loc",
    "message"}`` spelling; a leading ``"body"`` is dropped from the path (``["body",
    "train_config", "train", "micro_batch_size"]`` prints as
    ``train_config.train.micro_batch_size``); list indices print as ``[0]``."""
    detail = body.get("detail", body.get("errors", body)) if isinstance(body, dict) else body
    if isinstance(detail, dict) and "errors" in detail:
        detail = detail["errors"]
    if not isinstance(detail, list):
        return [_detail(body)]
    lines = []
    for item in detail:
        if not isinstance(item, dict):
            lines.append(str(item))
            continue
        loc = list(item.get("loc") or item.get("path") or [])
        if loc and loc[0] == "body":
            loc = loc[1:]
        path = ""
        for part in loc:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        message = item.get("msg") or item.get("message") or json.dumps(item)
        lines.append(f"{path}: {message}" if path else str(message))
    return lines


def _request(
    client: httpx.Client, method: str, path: str, *, what: str = "", **kwargs: Any
) -> httpx.Response:
    """Send one request and turn every failure into ClientError; returns 2xx responses."""
    try:
        response = client.request(method, path, **kwargs)
    except httpx.ConnectError:
        raise ClientError(
            f"cannot connect to {client.base_url}: connection refused "
            f"(is the server running? set --url or MOEJOBS_URL)"
        ) from None
    except httpx.TimeoutException:
        raise ClientError(f"{client.base_url} did not answer {method} {path} in time") from None
    except httpx.HTTPError as error:
        raise ClientError(f"{method} {client.base_url}{path} failed: {error}") from None
    _raise_for_status(client, response, what)
    return response


def _raise_for_status(client: httpx.Client, response: httpx.Response, what: str) -> None:
    code = response.status_code
    if code < 400:
        return
    try:
        body: Any = response.json()
    except (ValueError, httpx.ResponseNotRead):
        try:
            body = response.text.strip()[:500]
        except httpx.ResponseNotRead:
            body = response.read().decode(errors="replace").strip()[:500]
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
        if isinstance(body, dict) and body.get("code") == "invalid_token":
            raise ClientError(
                f"{client.base_url} rejected the API token (check --token or MOEJOBS_API_TOKEN)",
                status_code=code,
                body=body,
            )
        raise ClientError(f"forbidden: {_detail(body)}", status_code=code, body=body)
    if code == 404:
        raise ClientError(
            f"not found: {what or response.request.url.path}"
            + (f" ({_detail(body)})" if body and what else ""),
            status_code=code,
            body=body,
        )
    if code == 422:
        lines = field_errors(body)
        raise ClientError(
            "invalid request:\n  " + "\n  ".join(lines), exit_code=2, status_code=code, body=body
        )
    if code == 409:
        raise ClientError(f"conflict: {_detail(body)}", status_code=code, body=body)
    raise ClientError(
        f"server error {code} on {response.request.method} "
        f"{response.request.url.path}: {_detail(body)}",
        status_code=code,
        body=body,
    )


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise ClientError(
            f"{response.request.url} answered {response.status_code} with "
            f"something that is not JSON"
        ) from None


# -- small helpers on API shapes --------------------------------------------------------------------


def steps_total(run: dict) -> int | None:
    """Optimizer steps the run will take, from its estimate (``estimate.plan.optimizer_steps``),
    or None when the run has no estimate."""
    estimate = run.get("estimate") or {}
    plan = estimate.get("plan") if isinstance(estimate, dict) else None
    value = (plan or {}).get("optimizer_steps") if isinstance(plan, dict) else None
    return int(value) if isinstance(value, (int, float)) else None


def _items(payload: Any) -> list:
    """The list inside a list endpoint's answer (a bare list or ``{"items": [...]}``)."""
    if isinstance(payload, list):
        return payload
    if isinstance(payload, dict):
        for key in ("items", "points", "metrics", "rows"):
            if isinstance(payload.get(key), list):
                return payload[key]
    return []


def _run_path(run_id: str) -> str:
    run_id = str(run_id).strip()
    try:
        uuid.UUID(run_id)
    except ValueError:
        raise ClientError(
            f"{run_id!r} is not a run id (a UUID like 3f2b6c1e-8a4d-4e7f-9c0a-1b2c3d4e5f60)"
        ) from None
    return f"/runs/{run_id}"


def _reason(run: dict) -> str:
    reason = run.get("failure_reason")
    message = run.get("failure_message")
    return ": ".join(str(p) for p in (reason, message) if p)


def _when(value: Any) -> str:
    """An API timestamp (ISO 8601, UTC) as ``2026-05-09 13:39:09 UTC``."""
    text = str(value or "")
    if len(text) >= 19 and text[10] == "T":
        return text[:10] + " " + text[11:19] + (" UTC" if text.endswith(("Z", "+00:00")) else "")
    return text


def _fmt(value: Any, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


# -- commands as functions ------------------------------------------------------------------------


def submit(
    base_url: str | None,
    train_path: str | Path,
    model_path: str | Path,
    name: str | None = None,
    preset: str | None = None,
    token: str | None = None,
    *,
    idempotency_key: str | None = None,
    out: IO[str] | None = None,
) -> dict:
    """Submit a run: read the two config documents (YAML or JSON files), POST them as
    ``{"name", "preset", "train_config", "model_config"}`` to ``/runs`` and return the created
    run (status ``queued``, estimate, warnings), printing its id and warnings on ``out``.

    ``name`` defaults to the train file's stem. An ``Idempotency-Key`` header is sent (a new
    uuid4 unless given) so a retried request never queues twice. Raises ClientError: exit code
    2 for unreadable documents and for a 422 (one ``path: message`` line per bad field)."""
    from service.config.issues import ConfigError
    from service.config.parse import load_document

    out = out or sys.stdout
    try:
        train = load_document(train_path)
        model = load_document(model_path)
    except ConfigError as error:
        raise ClientError(str(error), exit_code=2) from None
    body: dict[str, Any] = {
        "name": name or Path(train_path).stem,
        "train_config": train,
        "model_config": model,
    }
    if preset:
        body["preset"] = preset
    headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
    with _client(base_url, token) as client:
        run = _json(_request(client, "POST", "/runs", json=body, headers=headers))
    print(f"submitted run {run.get('id')} ({run.get('name')}): {run.get('status')}", file=out)
    if run.get("created") is False:
        print("  (the same request was submitted before: this is that run)", file=out)
    if run.get("enqueued") is False:
        print(
            "  the broker was unreachable: the run stays queued until the reconciler sends it",
            file=out,
        )
    total = steps_total(run)
    if total is not None:
        print(f"  {total} optimizer steps planned", file=out)
    for warning in run.get("warnings") or []:
        print(f"  warning: {_warning_text(warning)}", file=out)
    return run


def _warning_text(warning: Any) -> str:
    if isinstance(warning, dict):
        loc = warning.get("loc") or warning.get("path")
        message = warning.get("message") or warning.get("msg") or json.dumps(warning)
        if isinstance(loc, (list, tuple)) and loc:
            loc = ".".join(str(p) for p in loc)
        return f"{loc}: {message}" if loc else str(message)
    return str(warning)


def list_runs(
    base_url: str | None,
    status: str | None = None,
    limit: int = 20,
    cursor: str | None = None,
    sort: str | None = None,
    token: str | None = None,
) -> dict:
    """One page of runs: ``{"items": [run, ...], "next_cursor": str | None}`` (newest first
    unless ``sort`` says otherwise). Raises ClientError (422 for a bad status/sort/cursor)."""
    params: dict[str, Any] = {"limit": limit}
    for key, value in (("status", status), ("cursor", cursor), ("sort", sort)):
        if value:
            params[key] = value
    with _client(base_url, token) as client:
        page = _json(_request(client, "GET", "/runs", params=params))
    if isinstance(page, list):  # tolerate a bare list
        page = {"items": page, "next_cursor": None}
    return page


def get_run(base_url: str | None, run_id: str, token: str | None = None) -> dict:
    """The run ``run_id`` as the API shows it. Raises ClientError (404: no such run)."""
    with _client(base_url, token) as client:
        return _json(_request(client, "GET", _run_path(run_id), what=f"run {run_id}"))


def latest_metric(client: httpx.Client, run_id: str) -> dict | None:
    """The run's last metric row (None before the first): ``max_points=2`` keeps the first and
    the last row of everything matched."""
    rows = _items(
        _json(
            _request(
                client,
                "GET",
                f"{_run_path(run_id)}/metrics",
                what=f"run {run_id}",
                params={"limit": 100_000, "max_points": 2},
            )
        )
    )
    rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)]
    return rows[-1] if rows else None


def iter_metrics(
    client: httpx.Client, run_id: str, after_step: int = -1, page: int = 1000
) -> Iterator[dict]:
    """Every metric row of the run with ``step > after_step``, in step order, paging through
    ``/runs/{id}/metrics?after_step=&limit=``."""
    while True:
        rows = _items(
            _json(
                _request(
                    client,
                    "GET",
                    f"{_run_path(run_id)}/metrics",
                    what=f"run {run_id}",
                    params={"after_step": after_step, "limit": page},
                )
            )
        )
        rows = [r for r in rows if isinstance(r.get("step"), int) and r["step"] > after_step]
        yield from rows
        if len(rows) < page:
            return
        after_step = rows[-1]["step"]


def data_progress(client: httpx.Client, run_id: str) -> str | None:
    """The message of the run's newest ``data_progress`` engine event while its text is being
    tokenized (``"12,345,678 tokens, 40% of 99.0 MB, 1.10M tokens/s, ETA 54 s"``), None when
    there is none or the newest says the tokenization is done. Raises ClientError."""
    events = _items(
        _json(
            _request(
                client,
                "GET",
                f"{_run_path(run_id)}/engine-events",
                what=f"run {run_id}'s engine events",
            )
        )
    )
    for event in reversed(events):
        if isinstance(event, dict) and event.get("event") == "data_progress":
            done = (event.get("data") or {}).get("done")
            return None if done else str(event.get("message") or "") or None
    return None


def status(
    base_url: str | None,
    run_id: str,
    follow: bool = False,
    token: str | None = None,
    *,
    poll_seconds: float = POLL_SECONDS,
    out: IO[str] | None = None,
    progress: bool = True,
) -> dict:
    """Print a run's status; return the run.

    With ``follow``: show a tqdm progress bar over optimizer steps (total from the estimate),
    fed by polling ``/runs/{id}/metrics?after_step=...`` every ``poll_seconds`` and showing the
    latest loss, tokens/s and tqdm's ETA (before the first step, the tokenization's progress
    while the run's text is being prepared: :func:`data_progress`), until the run is terminal; then print the final
    status and the failure reason, if any, and return the final run. Raises ClientError."""
    out = out or sys.stdout
    with _client(base_url, token) as client:
        run = _json(_request(client, "GET", _run_path(run_id), what=f"run {run_id}"))
        if not follow:
            _print_run(run, client, run_id, out)
            return run
        from tqdm import tqdm

        total = steps_total(run)
        latest = latest_metric(client, run_id)
        last_step = latest["step"] if latest else -1
        bar = tqdm(
            total=total,
            unit="step",
            desc=str(run.get("name") or run_id)[:30],
            file=out,
            dynamic_ncols=True,
            disable=not progress,
        )
        try:
            while True:
                for row in iter_metrics(client, run_id, last_step):
                    latest = row
                    last_step = row["step"]
                if latest is not None:
                    bar.update(max(0, last_step - bar.n))
                    bar.set_postfix_str(_postfix(latest), refresh=True)
                else:
                    tokenizing = data_progress(client, run_id)
                    state = f"tokenizing: {tokenizing}" if tokenizing else run.get("status")
                    bar.set_description_str(
                        f"{str(run.get('name') or run_id)[:30]} [{state}]", refresh=True
                    )
                # The run was read before the metrics above: when it was already terminal,
                # every row it will ever have has been read.
                if run.get("status") in TERMINAL:
                    break
                time.sleep(poll_seconds)
                run = _json(_request(client, "GET", _run_path(run_id), what=f"run {run_id}"))
        finally:
            bar.close()
        line = f"run {run.get('id', run_id)} {run.get('status')}"
        if last_step >= 0:
            line += f" after {last_step} step{'s' if last_step != 1 else ''}"
        if _reason(run):
            line += f": {_reason(run)}"
        print(line, file=out)
        return run


def _postfix(row: dict) -> str:
    parts = [f"loss={_fmt(row.get('loss'))}"]
    if row.get("val_loss") is not None:
        parts.append(f"val={_fmt(row.get('val_loss'))}")
    if row.get("tokens_per_sec") is not None:
        parts.append(f"tok/s={row['tokens_per_sec']:,.0f}")
    return ", ".join(parts)


def _print_run(run: dict, client: httpx.Client, run_id: str, out: IO[str]) -> None:
    total = steps_total(run)
    print(f"run      {run.get('id')}", file=out)
    print(f"name     {run.get('name')}", file=out)
    print(
        f"status   {run.get('status')}" + (f" ({_reason(run)})" if _reason(run) else ""), file=out
    )
    for key in ("created_at", "started_at", "finished_at"):
        if run.get(key):
            print(f"{key.split('_')[0]:<8} {_when(run[key])}", file=out)
    last = latest_metric(client, run_id)
    if last:
        done = f"{last['step']}/{total}" if total else str(last["step"])
        print(f"steps    {done}  {_postfix(last)}", file=out)
    else:
        if total:
            print(f"steps    0/{total}", file=out)
        tokenizing = data_progress(client, run_id)
        if tokenizing:
            print(f"data     tokenizing: {tokenizing}", file=out)
    for warning in run.get("warnings") or []:
        print(f"warning  {_warning_text(warning)}", file=out)


def cancel(
    base_url: str | None, run_id: str, token: str | None = None, *, out: IO[str] | None = None
) -> dict:
    """Ask the server to cancel a run (``POST /runs/{id}/cancel``); returns the run. A queued
    run is cancelled at once; a running one stops after its worker sees the request. Raises
    ClientError (404 no such run, 409 the run already finished)."""
    out = out or sys.stdout
    with _client(base_url, token) as client:
        run = _json(_request(client, "POST", f"{_run_path(run_id)}/cancel", what=f"run {run_id}"))
    if run.get("status") == "cancelled":
        print(f"run {run.get('id', run_id)} cancelled", file=out)
    else:
        print(
            f"run {run.get('id', run_id)}: cancel requested (status {run.get('status')}); "
            f"it stops after its next checkpoint",
            file=out,
        )
    return run


def download(
    base_url: str | None,
    run_id: str,
    step: int | str | None = None,
    out: str | Path | None = None,
    token: str | None = None,
    *,
    stdout: IO[str] | None = None,
) -> Path:
    """Download a checkpoint (``step`` number, or the final one when None) through
    ``/runs/{id}/checkpoints/{step|final}/archive``.

    ``out`` ending in ``.tar`` is written as the archive itself; any other path is a folder to
    extract into (it must not exist or be empty; default ``./<run id>-<final|step-N>``); when
    every member of the archive sits under one top folder, that folder's contents land
    directly in ``out`` (``out/lit_model.pth``). The transfer goes to a temporary name next to
    ``out`` and is renamed when complete. Members that would escape the folder, links and
    devices are refused (tarfile's ``data`` filter). Returns the written path. Raises
    ClientError (404: no such run or checkpoint)."""
    stdout = stdout or sys.stdout
    ref = "final" if step is None or str(step) == "final" else str(int(step))
    label = "final" if ref == "final" else f"step-{int(ref):08d}"
    target = Path(out) if out is not None else Path(f"{run_id}-{label}")
    as_tar = target.suffix == ".tar"
    if target.exists() and not (target.is_dir() and not as_tar and not any(target.iterdir())):
        raise ClientError(f"{target} already exists: choose another --out or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    path = f"{_run_path(run_id)}/checkpoints/{ref}/archive"
    with _client(base_url, token, timeout=httpx.Timeout(REQUEST_TIMEOUT, read=300.0)) as client:
        try:
            with client.stream("GET", path, headers={"Accept": "application/x-tar"}) as response:
                what = f"checkpoint {'final' if ref == 'final' else 'step ' + ref} of run {run_id}"
                if response.status_code >= 400:
                    response.read()
                    if (
                        response.status_code == 404
                        and _error_code(response) == "checkpoint_not_found"
                    ):
                        raise ClientError(
                            missing_checkpoint_message(client, run_id, what),
                            status_code=404,
                            body=_json_or_none(response),
                        )
                _raise_for_status(client, response, what)
                total = int(response.headers.get("content-length") or 0) or None
                if as_tar:
                    _stream_to_file(response, target, total, stdout)
                else:
                    _stream_extract(response, target, stdout)
        except httpx.ConnectError:
            raise ClientError(
                f"cannot connect to {client.base_url}: connection refused "
                f"(is the server running? set --url or MOEJOBS_URL)"
            ) from None
        except httpx.TimeoutException:
            raise ClientError(f"the download from {client.base_url} stalled") from None
        except httpx.HTTPError as error:
            raise ClientError(f"download from {client.base_url} failed: {error}") from None
    print(f"checkpoint {label} of run {run_id} -> {target}", file=stdout)
    return target


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error_code(response: httpx.Response) -> str | None:
    """The ``code`` of an API error body (``checkpoint_not_found``, ...), else None."""
    body = _json_or_none(response)
    return str(body["code"]) if isinstance(body, dict) and body.get("code") else None


#: How many checkpoint names a "not found" message lists (the newest ones).
LISTED_CHECKPOINTS = 5


def missing_checkpoint_message(client: httpx.Client, run_id: str, what: str) -> str:
    """The one-line message for a checkpoint the run does not have: ``not found: WHAT``, the
    run's status, and the checkpoints it does have (``GET /runs/{id}/checkpoints``, the newest
    :data:`LISTED_CHECKPOINTS`) with the ``--step`` that picks one, e.g. for a cancelled run
    ``...; its checkpoints: step-00000036, step-00000039; download one with --step N (e.g.
    --step 39)``. When those extra reads fail, the message is ``not found: WHAT`` alone.
    Raises nothing."""
    message = f"not found: {what}"
    try:
        run = _json(_request(client, "GET", _run_path(run_id), what=f"run {run_id}"))
        checkpoints = _items(
            _json(_request(client, "GET", f"{_run_path(run_id)}/checkpoints", what=f"run {run_id}"))
        )
    except ClientError:
        return message
    status = run.get("status") if isinstance(run, dict) else None
    if status:
        message += f" (the run is {status})"
    names = [c.get("name") for c in checkpoints if isinstance(c, dict) and c.get("name")]
    if not names:
        return message + "; it has no checkpoints" + ("" if status in TERMINAL else " yet")
    shown = names[-LISTED_CHECKPOINTS:]
    listed = ", ".join(shown)
    if len(names) > len(shown):
        listed = f"{len(names) - len(shown)} older, " + listed
    steps = [
        c.get("step")
        for c in checkpoints
        if isinstance(c, dict) and c.get("name") != "final" and isinstance(c.get("step"), int)
    ]
    hints = []
    if steps:
        hints.append(
            f"--step {steps[-1]}" if len(steps) == 1 else f"--step N (e.g. --step {steps[-1]})"
        )
    if "final" in names:
        hints.append("without --step for final")
    message += f"; its checkpoints: {listed}"
    return f"{message}; download one with {' or '.join(hints)}" if hints else message


def _stream_to_file(
    response: httpx.Response, target: Path, total: int | None, stdout: IO[str]
) -> None:
    from tqdm import tqdm

    partial = target.with_name(target.name + ".part")
    try:
        with (
            open(partial, "wb") as fh,
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=stdout,
                disable=not total,
            ) as bar,
        ):
            for chunk in response.iter_bytes(1 << 20):
                fh.write(chunk)
                bar.update(len(chunk))
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


class _ResponseReader:
    """A read()-able file object over a streamed response (what ``tarfile.open(mode="r|")``
    needs), so a multi-gigabyte checkpoint is never held in memory."""

    def __init__(self, response: httpx.Response):
        self._chunks = response.iter_bytes(1 << 20)
        self._buffer = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            try:
                self._buffer += next(self._chunks)
            except StopIteration:
                break
        if size < 0:
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


def _stream_extract(response: httpx.Response, target: Path, stdout: IO[str]) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            with tarfile.open(fileobj=_ResponseReader(response), mode="r|*") as archive:
                for member in archive:
                    archive.extract(member, staging, filter="data")
        except (tarfile.TarError, OSError) as error:
            raise ClientError(f"the archive could not be extracted: {error}") from None
        entries = list(staging.iterdir())
        source = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging
        if target.exists():  # an empty folder (checked before the download)
            target.rmdir()
        source.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def smoke_test(
    base_url: str | None,
    wait: float = 900.0,
    token: str | None = None,
    *,
    poll_seconds: float = 10.0,
    out: IO[str] | None = None,
) -> dict:
    """Start the server's smoke test (``POST /smoke-test``; when one is already running, follow
    that one) and wait up to ``wait`` seconds for its verdict through ``GET
    /smoke-test/{id}?wait=``. Prints each stage with its time and, on failure, the failing
    stage; returns the last answer. Raises ClientError when it cannot be started or read, or
    does not finish in time."""
    out = out or sys.stdout
    deadline = time.monotonic() + wait
    with _client(base_url, token, timeout=REQUEST_TIMEOUT + 60) as client:
        try:
            started = _json(_request(client, "POST", "/smoke-test"))
        except ClientError as error:
            running = _smoke_id(error.body) if error.status_code == 409 else None
            if running is None:
                raise
            print(f"a smoke test is already running ({running}): following it", file=out)
            started = {"id": running}
        test_id = _smoke_id(started)
        if test_id is None:
            raise ClientError(f"POST /smoke-test answered without an id: {started!r}")
        print(f"smoke test {test_id} started", file=out)
        result = started
        while True:
            remaining = deadline - time.monotonic()
            if _smoke_done(result) or remaining <= 0:
                break
            result = _json(
                _request(
                    client,
                    "GET",
                    f"/smoke-test/{test_id}",
                    params={"wait": int(max(1, min(remaining, 60)))},
                    what=f"smoke test {test_id}",
                )
            )
            if not _smoke_done(result):
                time.sleep(min(poll_seconds, max(0.0, deadline - time.monotonic())))
    for line in smoke_lines(result):
        print(line, file=out)
    if not _smoke_done(result):
        raise ClientError(f"smoke test {test_id} did not finish within {wait:g} s")
    return result


def _smoke_id(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    for key in ("id", "run_id", "smoke_test_id", "running_id"):
        if body.get(key):
            return str(body[key])
    if "detail" in body:
        return _smoke_id(body["detail"])
    return None


def smoke_state(result: dict) -> str:
    """``"passed"``, ``"failed"`` or ``"running"`` for a ``/smoke-test/{id}`` answer."""
    if result.get("passed") is True:
        return "passed"
    if result.get("passed") is False:
        return "failed"
    status = str(result.get("status") or result.get("result") or result.get("state") or "")
    if status in ("passed", "succeeded", "ok", "pass"):
        return "passed"
    if status in ("failed", "cancelled", "error", "fail", "timeout"):
        return "failed"
    return "running"


def _smoke_done(result: dict) -> bool:
    return smoke_state(result) != "running"


def smoke_stages(result: dict) -> list[tuple[str, float | None, str]]:
    """``(stage, seconds or None, state)`` for each stage of a smoke-test answer; accepts a
    list of ``{name|stage, seconds|duration_s|elapsed_s, status|ok}`` or a mapping name ->
    seconds (or -> such a dict)."""
    stages = result.get("stages") or result.get("timings") or []
    rows = []
    if isinstance(stages, dict):
        stages = [
            dict(v, name=k) if isinstance(v, dict) else {"name": k, "seconds": v}
            for k, v in stages.items()
        ]
    for stage in stages if isinstance(stages, list) else []:
        if not isinstance(stage, dict):
            continue
        name = str(stage.get("name") or stage.get("stage") or "?")
        seconds = next(
            (
                stage[k]
                for k in ("seconds", "duration_s", "elapsed_s", "duration")
                if isinstance(stage.get(k), (int, float))
            ),
            None,
        )
        state = stage.get("status") or stage.get("state")
        if state is None and "ok" in stage:
            state = "ok" if stage["ok"] else "failed"
        rows.append((name, seconds, str(state or "")))
    return rows


def smoke_lines(result: dict) -> list[str]:
    """The lines ``smoke-test`` prints: one per stage, then the verdict."""
    lines = []
    for name, seconds, state in smoke_stages(result):
        took = f"{seconds:8.1f} s" if seconds is not None else "       - "
        lines.append(f"  {name:<24}{took}  {state}")
    verdict = smoke_state(result)
    line = f"smoke test {verdict}"
    failed = result.get("failed_stage") or result.get("failing_stage")
    if verdict == "failed" and failed:
        line += f" at stage {failed}"
    message = result.get("message") or result.get("error") or result.get("reason")
    if verdict == "failed" and message:
        line += f": {message}"
    lines.append(line)
    return lines


# -- argparse glue --------------------------------------------------------------------------------


def _run_command(fn: Callable[[], Any]) -> int:
    try:
        fn()
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """``moejobs submit TRAIN MODEL [--name] [--preset] [--follow]``."""

    def go() -> None:
        run = submit(
            args.url,
            args.train_config,
            args.model_config,
            name=args.name,
            preset=args.preset,
            token=args.token,
        )
        if getattr(args, "follow", False):
            final = status(args.url, run["id"], follow=True, token=args.token)
            if final.get("status") != "succeeded":
                raise ClientError(
                    f"run {final.get('id')} {final.get('status')}"
                    + (f": {_reason(final)}" if _reason(final) else "")
                )

    return _run_command(go)


def cmd_runs(args: argparse.Namespace) -> int:
    """``moejobs runs [--status S] [--limit N] [--sort KEY] [--cursor C]``: a table."""

    def go() -> None:
        page = list_runs(
            args.url,
            status=args.status,
            limit=args.limit,
            cursor=args.cursor,
            sort=args.sort,
            token=args.token,
        )
        items = page.get("items") or []
        if not items:
            print("no runs")
        else:
            print(f"{'ID':<36}  {'STATUS':<9}  {'CREATED (UTC)':<19}  {'PLANNED':>8}  NAME")
            for run in items:
                created = str(run.get("created_at") or "")[:19].replace("T", " ")
                total = steps_total(run)
                print(
                    f"{run.get('id', ''):<36}  {run.get('status', ''):<9}  {created:<19}  "
                    f"{'' if total is None else total:>8}  {run.get('name', '')}"
                )
        if page.get("next_cursor"):
            print(f"more: --cursor {page['next_cursor']}")

    return _run_command(go)


def cmd_status(args: argparse.Namespace) -> int:
    """``moejobs status ID [--follow]``: with --follow, exit 0 only if the run succeeded."""
    result: dict = {}

    def go() -> None:
        result.update(status(args.url, args.run_id, follow=args.follow, token=args.token))

    code = _run_command(go)
    if code == 0 and args.follow and result.get("status") != "succeeded":
        return 1
    return code


def cmd_cancel(args: argparse.Namespace) -> int:
    """``moejobs cancel ID``."""
    return _run_command(lambda: cancel(args.url, args.run_id, token=args.token))


def cmd_download(args: argparse.Namespace) -> int:
    """``moejobs download ID [--step N] [--out PATH]``."""
    return _run_command(
        lambda: download(args.url, args.run_id, step=args.step, out=args.out, token=args.token)
    )


def cmd_smoke_test(args: argparse.Namespace) -> int:
    """``moejobs smoke-test [--wait S]``: exit 0 when it passed, 1 otherwise."""
    result: dict = {}

    def go() -> None:
        result.update(smoke_test(args.url, wait=args.wait, token=args.token))

    code = _run_command(go)
    if code == 0 and smoke_state(result) != "passed":
        return 1
    return code


def _step(value: str) -> str:
    if value == "final" or value.isdigit():
        return value
    raise argparse.ArgumentTypeError(f"expected a step number or 'final', got {value!r}")


def add_client_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``submit``, ``runs``, ``status``, ``cancel``, ``download`` and ``smoke-test``
    on ``subparsers`` (from ``ArgumentParser.add_subparsers``). Each sets ``func`` to its
    ``cmd_*`` function: ``return args.func(args)`` runs it. Every command takes ``--url``
    (default: settings) and ``--token`` (default: MOEJOBS_API_TOKEN)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=None,
        help="API base URL (default: MOEJOBS_URL, else http://MOEJOBS_HOST:PORT)",
    )
    common.add_argument(
        "--token", default=None, help="API bearer token (default: MOEJOBS_API_TOKEN)"
    )

    p = subparsers.add_parser(
        "submit", parents=[common], help="submit a training run to the server"
    )
    p.add_argument("train_config", help="train config (YAML or JSON)")
    p.add_argument("model_config", help="model config (YAML or JSON)")
    p.add_argument("--name", default=None, help="run name (default: the train file's name)")
    p.add_argument("--preset", default=None, help="preset applied by the server")
    p.add_argument("--follow", action="store_true", help="then follow it like status --follow")
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("runs", parents=[common], help="list runs on the server")
    p.add_argument(
        "--status", default=None, choices=["queued", "running", "succeeded", "failed", "cancelled"]
    )
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--sort", default=None, help="created_at, name or status; '-' for descending")
    p.add_argument("--cursor", default=None, help="next page (printed after a full page)")
    p.set_defaults(func=cmd_runs)

    p = subparsers.add_parser("status", parents=[common], help="show a run")
    p.add_argument("run_id")
    p.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="progress bar until the run finishes (exit 0 only if it succeeded)",
    )
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("cancel", parents=[common], help="cancel a run")
    p.add_argument("run_id")
    p.set_defaults(func=cmd_cancel)

    p = subparsers.add_parser(
        "download", parents=[common], help="download a checkpoint folder (LitGPT format)"
    )
    p.add_argument("run_id")
    p.add_argument(
        "--step", type=_step, default=None, help="checkpoint step (default: the final checkpoint)"
    )
    p.add_argument(
        "--out", default=None, help="folder to extract into, or a .tar file (default: ./ID-final)"
    )
    p.set_defaults(func=cmd_download)

    p = subparsers.add_parser(
        "smoke-test",
        parents=[common],
        help="run the server's smoke test and print its stage timings",
    )
    p.add_argument("--wait", type=float, default=900.0, help="seconds to wait for the verdict")
    p.set_defaults(func=cmd_smoke_test)
