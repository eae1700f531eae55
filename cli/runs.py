"""``moejobs submit/runs/status/cancel/download/smoke-test/delete/logs/compare/tag``: the
commands that talk to a server.

Two layers:

- functions (:func:`submit`, :func:`list_runs`, :func:`get_run`, :func:`status`,
  :func:`cancel`, :func:`download`, :func:`smoke_test`) that talk to the API through
  :class:`cli.http.Api`, print progress to ``out`` (lines from :mod:`cli.output`) and return the
  API's models (``service.api.models``); they raise :class:`cli.http.ClientError` (a one-line
  message and the exit code to use) for every failure a user can cause or fix: server down,
  401, 404, 409, 422, 5xx.
- ``cmd_*`` functions taking the ``argparse.Namespace`` of :func:`cli.main.build_parser` that
  print ``error: <message>`` on stderr and return the exit code: 0 ok, 1 failure (server
  unreachable, run failed, not found, ...), 2 invalid config (a 422).

Every command takes ``--url`` (default: the settings, :func:`cli.http.default_base_url`) and
``--token`` (default: ``MOEJOBS_API_TOKEN``). Torch-free.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, cast

import httpx

from cli import output
from cli.http import REQUEST_TIMEOUT, Api, ClientError, running_smoke_test
from service.api.models import (
    Comparison,
    MetricRow,
    RunCreated,
    RunPage,
    RunPublic,
    SmokeTestPublic,
)

#: Seconds between polls of ``status --follow``.
POLL_SECONDS = 2.0


# -- commands as functions ------------------------------------------------------------------------


def submit(
    base_url: str | None,
    train_path: str | Path,
    model_path: str | Path,
    name: str | None = None,
    preset: str | None = None,
    token: str | None = None,
    *,
    tags: Sequence[str] = (),
    note: str | None = None,
    idempotency_key: str | None = None,
    out: IO[str] | None = None,
) -> RunCreated:
    """Submit a run: read the two config documents (YAML or JSON files), POST them as
    ``{"name", "preset", "train_config", "model_config"}`` to ``/runs`` and return the created
    run (status ``queued``, estimate, warnings), printing its id and warnings on ``out``.

    ``name`` defaults to the train file's stem; ``tags`` and ``note`` go with the run. An ``Idempotency-Key`` header is sent (a new
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
    if tags:
        body["tags"] = list(tags)
    if note is not None:
        body["note"] = note
    with Api(base_url, token) as api:
        run = api.create_run(body, idempotency_key or str(uuid.uuid4()))
    print(f"submitted run {run.id} ({run.name}): {run.status}", file=out)
    if not run.created:
        print("  (the same request was submitted before: this is that run)", file=out)
    if not run.enqueued:
        print(
            "  the broker was unreachable: the run stays queued until the reconciler sends it",
            file=out,
        )
    total = output.steps_total(run)
    if total is not None:
        print(f"  {total} optimizer steps planned", file=out)
    for warning in run.warnings:
        print(f"  warning: {output.issue(warning)}", file=out)
    return run


def list_runs(
    base_url: str | None,
    status: str | None = None,
    limit: int = 20,
    cursor: str | None = None,
    sort: str | None = None,
    token: str | None = None,
    *,
    tags: Sequence[str] = (),
    name: str | None = None,
) -> RunPage:
    """One page of runs (newest first unless ``sort`` says otherwise) and the cursor of the
    next; ``tags``: only runs carrying all of them, ``name``: only runs whose name contains
    it (any case). Raises ClientError (422 for a bad status/sort/cursor/tag)."""
    with Api(base_url, token) as api:
        return api.list_runs(
            limit=limit,
            status=status or None,
            cursor=cursor or None,
            sort=sort or None,
            tag=list(tags) or None,
            name=name or None,
        )


def get_run(base_url: str | None, run_id: str, token: str | None = None) -> RunPublic:
    """The run ``run_id`` as the API shows it. Raises ClientError (404: no such run)."""
    with Api(base_url, token) as api:
        return api.get_run(run_id)


def latest_metric(api: Api, run_id: str) -> MetricRow | None:
    """The run's last metric row (None before the first): ``max_points=2`` keeps the first and
    the last row of everything matched."""
    rows = api.metrics(run_id, limit=100_000, max_points=2).items
    return rows[-1] if rows else None


def iter_metrics(
    api: Api, run_id: str, after_step: int = -1, page: int = 1000
) -> Iterator[MetricRow]:
    """Every metric row of the run with ``step > after_step``, in step order, paging through
    ``/runs/{id}/metrics?after_step=&limit=``."""
    while True:
        rows = api.metrics(run_id, after_step=after_step, limit=page).items
        yield from rows
        if len(rows) < page:
            return
        after_step = rows[-1].step


def data_progress(api: Api, run_id: str) -> str | None:
    """The message of the run's newest ``data_progress`` engine event while its text is being
    tokenized (``"12,345,678 tokens, 40% of 99.0 MB, 1.10M tokens/s, ETA 54 s"``), None when
    there is none or the newest says the tokenization is done. Raises ClientError."""
    for event in reversed(api.engine_events(run_id)):
        if event.event == "data_progress":
            return None if event.data.get("done") else event.message or None
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
) -> RunPublic:
    """Print a run's status; return the run.

    With ``follow``: show a tqdm progress bar over optimizer steps (total from the estimate),
    fed by polling ``/runs/{id}/metrics?after_step=...`` every ``poll_seconds`` and showing the
    latest loss, tokens/s and tqdm's ETA (before the first step, the tokenization's progress
    while the run's text is being prepared: :func:`data_progress`), until the run is terminal;
    then print the final status and the failure reason, if any, and return the final run.
    Raises ClientError."""
    out = out or sys.stdout
    with Api(base_url, token) as api:
        run = api.get_run(run_id)
        if not follow:
            _print_run(run, api, run_id, out)
            return run
        from tqdm import tqdm

        from worker.progress import width_options

        total = output.steps_total(run)
        latest = latest_metric(api, run_id)
        last_step = latest.step if latest else -1
        # The bar starts at the step already reached: tqdm's rate and ETA then count only the
        # steps made while following, not the caught-up ones as done in an instant.
        bar = tqdm(
            total=total,
            initial=max(0, last_step),
            unit="step",
            desc=output.bar_label(run),
            file=out,
            disable=not progress,
            **width_options(out),
        )
        try:
            while True:
                for row in iter_metrics(api, run_id, last_step):
                    latest = row
                    last_step = row.step
                if latest is not None:
                    bar.update(max(0, last_step - bar.n))
                    bar.set_description_str(output.bar_label(run), refresh=False)
                    bar.set_postfix_str(output.postfix(latest), refresh=True)
                else:
                    tokenizing = data_progress(api, run_id)
                    state = f"tokenizing: {tokenizing}" if tokenizing else None
                    bar.set_description_str(output.bar_label(run, state), refresh=True)
                # The run was read before the metrics above: when it was already terminal,
                # every row it will ever have has been read.
                if output.is_terminal(run):
                    bar.set_description_str(output.bar_label(run), refresh=True)
                    break
                time.sleep(poll_seconds)
                run = api.get_run(run_id)
        finally:
            bar.close()
        print(output.final_line(run, last_step), file=out)
        return run


def _print_run(run: RunPublic, api: Api, run_id: str, out: IO[str]) -> None:
    total = output.steps_total(run)
    reason = output.reason(run)
    print(f"run      {run.id}", file=out)
    print(f"name     {run.name}", file=out)
    print(f"status   {run.status}" + (f" ({reason})" if reason else ""), file=out)
    for label, value in (
        ("created", run.created_at),
        ("started", run.started_at),
        ("finished", run.finished_at),
    ):
        if value is not None:
            print(f"{label:<8} {output.when(value)}", file=out)
    last = latest_metric(api, run_id)
    if last:
        done = f"{last.step}/{total}" if total else str(last.step)
        print(f"steps    {done}  {output.postfix(last)}", file=out)
    else:
        if total:
            print(f"steps    0/{total}", file=out)
        tokenizing = data_progress(api, run_id)
        if tokenizing:
            print(f"data     tokenizing: {tokenizing}", file=out)
    if run.tags:
        print(f"tags     {', '.join(run.tags)}", file=out)
    if run.note:
        print(f"note     {run.note}", file=out)
    for warning in run.warnings:
        print(f"warning  {output.issue(warning)}", file=out)


def cancel(
    base_url: str | None, run_id: str, token: str | None = None, *, out: IO[str] | None = None
) -> RunPublic:
    """Ask the server to cancel a run (``POST /runs/{id}/cancel``); returns the run. A queued
    run is cancelled at once; a running one stops after its worker sees the request. Raises
    ClientError (404 no such run, 409 the run already finished)."""
    out = out or sys.stdout
    with Api(base_url, token) as api:
        run = api.cancel_run(run_id)
    if run.status == "cancelled":
        print(f"run {run.id} cancelled", file=out)
    else:
        print(
            f"run {run.id}: cancel requested (status {run.status}); "
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
    weights_only: bool = False,
    fmt: str = "pth",
    stdout: IO[str] | None = None,
) -> Path:
    """Download a checkpoint (``step`` number, or the final one when None) through
    ``/runs/{id}/checkpoints/{step|final}/archive``. ``weights_only`` leaves the training state
    out (``?include=weights``); ``fmt="safetensors"`` gets ``model.safetensors`` instead of
    ``lit_model.pth`` (``?format=safetensors``, weights only).

    ``out`` ending in ``.tar`` is written as the archive itself; any other path is a folder to
    extract into (it must not exist or be empty; default ``./<run id>-<final|step-N>``); when
    every member of the archive sits under one top folder, that folder's contents land
    directly in ``out`` (``out/lit_model.pth``). The transfer goes to a temporary name next to
    ``out`` and is renamed when complete. Members that would escape the folder, links and
    devices are refused (tarfile's ``data`` filter). Returns the written path. Raises
    ClientError (404: no such run or checkpoint; for a checkpoint the run lacks, the message
    lists the ones it has: :func:`cli.output.missing_checkpoint`)."""
    stdout = stdout or sys.stdout
    ref = "final" if step is None or str(step) == "final" else str(int(step))
    label = "final" if ref == "final" else f"step-{int(ref):08d}"
    target = Path(out) if out is not None else Path(f"{run_id}-{label}")
    as_tar = target.suffix == ".tar"
    if target.exists() and not (target.is_dir() and not as_tar and not any(target.iterdir())):
        raise ClientError(f"{target} already exists: choose another --out or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    what = f"checkpoint {'final' if ref == 'final' else 'step ' + ref} of run {run_id}"
    variant: dict[str, str] = {"include": "weights"} if weights_only else {}
    if fmt != "pth":
        variant["format"] = fmt
    with Api(base_url, token, timeout=httpx.Timeout(REQUEST_TIMEOUT, read=300.0)) as api:
        try:
            with api.archive(run_id, ref, what, params=variant) as response:
                total = int(response.headers.get("content-length") or 0) or None
                if as_tar:
                    _stream_to_file(response, target, total, stdout)
                else:
                    _stream_extract(response, target)
        except ClientError as error:
            if error.body is None or error.body.code != "checkpoint_not_found":
                raise
            raise ClientError(
                _missing_checkpoint(api, run_id, what), status_code=404, body=error.body
            ) from None
    print(f"checkpoint {label} of run {run_id} -> {target}", file=stdout)
    return target


def _missing_checkpoint(api: Api, run_id: str, what: str) -> str:
    """:func:`cli.output.missing_checkpoint` from the run and its checkpoints; ``not found:
    WHAT`` alone when those cannot be read. Raises nothing."""
    try:
        run = api.get_run(run_id)
        checkpoints = api.checkpoints(run_id)
    except ClientError:
        return f"not found: {what}"
    return output.missing_checkpoint(what, run, checkpoints)


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


def _stream_extract(response: httpx.Response, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            reader = cast(IO[bytes], _ResponseReader(response))  # read() is all "r|*" calls
            with tarfile.open(fileobj=reader, mode="r|*") as archive:
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


def delete(
    base_url: str | None, run_id: str, token: str | None = None, *, out: IO[str] | None = None
) -> None:
    """Delete a finished run, its rows and its files (``DELETE /runs/ID``). Raises ClientError
    (404 no such run, 409 while it is queued or running: cancel it first; 409 with the
    server's message while queued or running runs start from its checkpoints)."""
    out = out or sys.stdout
    with Api(base_url, token) as api:
        try:
            api.delete_run(run_id)
        except ClientError as error:
            if error.status_code == 409 and (error.body is None or error.body.code == "run_active"):
                raise ClientError(
                    f"run {run_id} is still queued or running: `moejobs cancel {run_id}` "
                    "first, then delete it once it has stopped",
                    status_code=409,
                    body=error.body,
                ) from None
            raise
    print(f"run {run_id} deleted", file=out)


def logs(
    base_url: str | None,
    run_id: str,
    tail: int = 200,
    follow: bool = False,
    token: str | None = None,
    *,
    poll_seconds: float = POLL_SECONDS,
    out: IO[str] | None = None,
) -> RunPublic | None:
    """Print the last ``tail`` lines of the run's log; with ``follow``, then the lines as they
    are written (polling ``/runs/ID/logs?after_byte=`` every ``poll_seconds``) until the run
    has ended and its log is read to the end; returns the final run then (None without
    ``follow``). Raises ClientError."""
    out = out or sys.stdout
    with Api(base_url, token) as api:
        text, offset = api.logs(run_id, tail=tail)
        out.write(text)
        out.flush()
        if not follow:
            return None
        if offset is None:
            raise ClientError("the server cannot follow a log (it is an older moejobs)")
        while True:
            run = api.get_run(run_id)  # before the read: a run that ended has its whole log
            while True:
                text, offset = api.logs(run_id, after_byte=offset)
                assert offset is not None
                out.write(text)
                out.flush()
                if not text:
                    break
            if output.is_terminal(run):
                last, size = api.logs(run_id, tail=1)
                if size is not None and size > offset:  # a last line without its newline
                    out.write(last)
                    out.flush()
                return run
            time.sleep(poll_seconds)


def compare(base_url: str | None, run_ids: Sequence[str], token: str | None = None) -> Comparison:
    """``GET /compare`` of the runs, in that order. Raises ClientError (404 unknown run, 422
    fewer than 2 runs)."""
    with Api(base_url, token) as api:
        return api.compare(list(run_ids))


def tag(
    base_url: str | None,
    run_id: str,
    *,
    add: Sequence[str] = (),
    remove: Sequence[str] = (),
    note: str | None = None,
    clear_note: bool = False,
    token: str | None = None,
    out: IO[str] | None = None,
) -> RunPublic:
    """Add and remove tags, set or clear the note of a run (``PATCH /runs/ID``; the tag
    changes are applied on the server, so concurrent changes both count); prints the run's
    tags and note. Nothing to change prints them only. Raises ClientError (422 invalid tag,
    exit code 2)."""
    out = out or sys.stdout
    body: dict[str, Any] = {}
    if add:
        body["add_tags"] = list(add)
    if remove:
        body["remove_tags"] = list(remove)
    if clear_note:
        body["note"] = None
    elif note is not None:
        body["note"] = note
    with Api(base_url, token) as api:
        run = api.patch_run(run_id, body) if body else api.get_run(run_id)
    print(f"run {run.id} tags: {', '.join(run.tags) or '-'}", file=out)
    if run.note:
        print(f"note: {run.note}", file=out)
    return run


def smoke_test(
    base_url: str | None,
    wait: float = 900.0,
    token: str | None = None,
    *,
    poll_seconds: float = 10.0,
    out: IO[str] | None = None,
) -> SmokeTestPublic:
    """Start the server's smoke test (``POST /smoke-test``; when one is already running, follow
    that one) and wait up to ``wait`` seconds for its verdict through ``GET
    /smoke-test/{id}?wait=``. Prints each stage with its time and, on failure, the failing
    stage; returns the last answer. Raises ClientError when it cannot be started or read, or
    does not finish in time."""
    out = out or sys.stdout
    deadline = time.monotonic() + wait
    result: SmokeTestPublic | None
    with Api(base_url, token, timeout=REQUEST_TIMEOUT + 60) as api:
        try:
            result = api.start_smoke_test()
            test_id = str(result.id)
        except ClientError as error:
            running = running_smoke_test(error)
            if running is None:
                raise
            print(f"a smoke test is already running ({running}): following it", file=out)
            result, test_id = None, running
        print(f"smoke test {test_id} started", file=out)
        while True:
            remaining = deadline - time.monotonic()
            if _smoke_done(result) or remaining <= 0:
                break
            result = api.smoke_test(test_id, wait=int(max(1, min(remaining, 60))))
            if not _smoke_done(result):
                time.sleep(min(poll_seconds, max(0.0, deadline - time.monotonic())))
    for line in output.smoke_lines(result):
        print(line, file=out)
    if result is None or not _smoke_done(result):
        raise ClientError(f"smoke test {test_id} did not finish within {wait:g} s")
    return result


def _smoke_done(result: SmokeTestPublic | None) -> bool:
    return result is not None and output.smoke_state(result) != "running"


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
            tags=getattr(args, "tag", None) or (),
            note=getattr(args, "note", None),
        )
        if getattr(args, "follow", False):
            final = status(args.url, str(run.id), follow=True, token=args.token)
            if final.status != "succeeded":
                reason = output.reason(final)
                raise ClientError(
                    f"run {final.id} {final.status}" + (f": {reason}" if reason else "")
                )

    return _run_command(go)


def cmd_runs(args: argparse.Namespace) -> int:
    """``moejobs runs [--status S] [--tag T]... [--name TEXT] [--limit N] [--sort KEY]
    [--cursor C]``: a table."""

    def go() -> None:
        page = list_runs(
            args.url,
            status=args.status,
            limit=args.limit,
            cursor=args.cursor,
            sort=args.sort,
            token=args.token,
            tags=getattr(args, "tag", None) or (),
            name=getattr(args, "name", None),
        )
        for line in output.runs_table(page.items):
            print(line)
        if page.next_cursor:
            print(f"more: --cursor {page.next_cursor}")

    return _run_command(go)


def cmd_status(args: argparse.Namespace) -> int:
    """``moejobs status ID [--follow]``: with --follow, exit 0 only if the run succeeded."""
    result: list[RunPublic] = []

    def go() -> None:
        result.append(status(args.url, args.run_id, follow=args.follow, token=args.token))

    code = _run_command(go)
    if code == 0 and args.follow and result[0].status != "succeeded":
        return 1
    return code


def cmd_cancel(args: argparse.Namespace) -> int:
    """``moejobs cancel ID``."""
    return _run_command(lambda: cancel(args.url, args.run_id, token=args.token))


def cmd_download(args: argparse.Namespace) -> int:
    """``moejobs download ID [--step N] [--out PATH] [--weights-only] [--format safetensors]``."""
    return _run_command(
        lambda: download(
            args.url,
            args.run_id,
            step=args.step,
            out=args.out,
            token=args.token,
            weights_only=args.weights_only,
            fmt=args.format,
        )
    )


def cmd_smoke_test(args: argparse.Namespace) -> int:
    """``moejobs smoke-test [--wait S]``: exit 0 when it passed, 1 otherwise."""
    result: list[SmokeTestPublic] = []

    def go() -> None:
        result.append(smoke_test(args.url, wait=args.wait, token=args.token))

    code = _run_command(go)
    if code == 0 and output.smoke_state(result[0]) != "passed":
        return 1
    return code


def cmd_delete(args: argparse.Namespace) -> int:
    """``moejobs delete ID``."""
    return _run_command(lambda: delete(args.url, args.run_id, token=args.token))


def cmd_logs(args: argparse.Namespace) -> int:
    """``moejobs logs ID [--tail N] [--follow]``."""
    return _run_command(
        lambda: logs(args.url, args.run_id, tail=args.tail, follow=args.follow, token=args.token)
    )


def cmd_compare(args: argparse.Namespace) -> int:
    """``moejobs compare ID ID ...``: the table of :func:`cli.output.compare_table`."""

    def go() -> None:
        for line in output.compare_table(compare(args.url, args.run_ids, token=args.token)):
            print(line)

    return _run_command(go)


def cmd_tag(args: argparse.Namespace) -> int:
    """``moejobs tag ID [--add T]... [--remove T]... [--note TEXT | --clear-note]``."""
    return _run_command(
        lambda: tag(
            args.url,
            args.run_id,
            add=args.add or (),
            remove=args.remove or (),
            note=args.note,
            clear_note=args.clear_note,
            token=args.token,
        )
    )
