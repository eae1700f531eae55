"""The fault suite: faults injected into a real deployment, each ending exactly once.

One stack for the module (``tests.support.faults.Stack``): a private PostgreSQL, a private
Redis, ``RUNS_DIR`` on a tmpfs, and two real workers (``python -m worker.celery_app``) with
leases of seconds. Cases where scheduling is the point run the stub engine (``worker.stub``,
steps of 50 ms); cases where the engine itself is under test (a trainer killed, a frozen
worker whose trainer must fence itself, a full disk inside ``torch.save``) train tiny real
MoE models with frequent checkpoints.

A worker is frozen twice: outside any database transaction (the trainer must fence itself)
and inside one that row-locks its run (PostgreSQL must end the frozen session, or every
reconciler blocks on that row and the run is never recovered).

Every case asserts the run's final state, that a sampler scanning ``/proc`` every 50 ms never
saw two training processes of the run alive at once, that the database's metric rows equal
``metrics.csv``, and that every checkpoint folder on disk is recorded exactly once and loads.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from service import contract
from service.models import FailureReason, RunStatus
from service.queue import enqueue_run
from tests.support.faults import (
    TIMING,
    Stack,
    all_workers_alive,
    assert_exactly_once,
    assert_one_trainer_at_a_time,
    new_name,
    pid_gone,
    report,
)
from tests.support.worker import wait_for

pytestmark = pytest.mark.slow

S = RunStatus
LEASE = TIMING["lease_seconds"]
#: Stub engine: seconds per optimizer step.
STUB_STEP = "0.05"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("faults"))
    try:
        yield stack.up()
    finally:
        stack.down()


def _stub(stack: Stack) -> None:
    stack.use_engine("stub", MOEJOBS_STUB_STEP_SECONDS=STUB_STEP)
    all_workers_alive(stack)


def _real(stack: Stack) -> None:
    stack.use_engine("litgpt")
    all_workers_alive(stack)


def _transitions(stack: Stack, run) -> list[tuple[str | None, str]]:
    return [(f, t) for f, t, *_ in stack.events(run)]


def _steps_once(stack: Stack, run, steps: int) -> None:
    from worker.metrics import read_metrics

    rows = read_metrics(stack.out_dir(run) / contract.METRICS_FILE)
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))


# -- stub engine: scheduling under faults ----------------------------------------------------------


def test_duplicate_delivery_trains_once(stack):
    """The same run id enqueued five times (before, during and after its training): one
    claim, one training process, one attempt."""
    _stub(stack)
    run = stack.submit(steps=60, save_interval=10, name=new_name("dup"), enqueue=False)
    for _ in range(3):  # both idle workers get a copy
        assert enqueue_run(stack.app, run.id).ok
    stack.wait_status(run, S.running, 60, "the run to start")
    assert enqueue_run(stack.app, run.id).ok
    done = stack.wait_done(run)
    assert enqueue_run(stack.app, run.id).ok
    rid = str(run.id)

    def ignored() -> int:
        return sum(
            1
            for line in stack.logs().splitlines()
            if rid in line and ("message ignored" in line or "claimed by someone else" in line)
        )

    wait_for(
        lambda: ignored() >= 4,
        60,
        "four duplicate messages to be ignored",
        on_fail=stack.on_fail(run),
    )

    assert done.status == S.succeeded, done.failure_message
    assert done.attempt == 1 and done.failures == 0
    assert _transitions(stack, run) == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
    ]
    view = assert_one_trainer_at_a_time(stack, run)
    assert len(view.pids) == 1
    _steps_once(stack, run, 60)
    assert_exactly_once(stack, run, real=False)
    report(stack, run)
    stack.forget(run)


def test_sigterm_of_a_worker_hands_the_run_over(stack):
    """A worker stopped with SIGTERM: its training checkpoints and exits 75, the run is
    re-queued without counting a failure, the stopping worker claims nothing, the other
    worker resumes it."""
    _stub(stack)
    run = stack.submit(steps=120, save_interval=10, name=new_name("sigterm"))
    running = stack.wait_status(run, S.running, 60, "the run to start")
    a = stack.worker_of(running)
    stack.wait_checkpoint_recorded(run, 10)
    trainer = stack.trainer_pid(run)
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(timeout=60) == 0, a.log()[-3000:]
    assert pid_gone(trainer)
    stack.spawn()  # a replacement for the next case (it may take the run, too)
    done = stack.wait_done(run)

    assert done.status == S.succeeded, done.failure_message
    assert done.attempt == 2 and not done.worker_id.endswith(a.worker_id_suffix)
    assert done.failures == 0
    events = stack.events(run)
    assert [(f, t) for f, t, *_ in events] == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
    ]
    assert events[2][2] is None and "shutting down" in events[2][4]
    stopped = [
        e
        for e in contract.read_events(stack.out_dir(run), attempt=1)
        if e.event == contract.EventKind.stop_requested
    ]
    assert stopped, "the first attempt never saw the stop request"
    view = assert_one_trainer_at_a_time(stack, run)
    assert len(view.pids) == 2
    _steps_once(stack, run, 120)
    assert_exactly_once(stack, run, real=False)
    report(stack, run)
    stack.forget(run)


def test_kill_9_of_a_worker(stack):
    """A worker killed (SIGKILL): its training dies with it, the lease expires, the other
    worker's reconciler re-queues the run (lost_worker, one failure) and resumes it."""
    _stub(stack)
    run = stack.submit(steps=100, save_interval=10, name=new_name("kill-worker"))
    running = stack.wait_status(run, S.running, 60, "the run to start")
    a = stack.worker_of(running)
    stack.wait_checkpoint_recorded(run, 10)
    trainer = stack.trainer_pid(run)
    killed_at = time.time()
    a.kill()
    stack.spawn()  # a replacement for the next case (it may take the run, too)
    wait_for(lambda: pid_gone(trainer), 10, "the training to die with its worker")
    done = stack.wait_done(run, timeout=120)

    assert done.status == S.succeeded, done.failure_message
    assert done.attempt == 2 and not done.worker_id.endswith(a.worker_id_suffix)
    events = stack.events(run)
    assert [(f, t) for f, t, *_ in events] == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
    ]
    assert events[2][2] == FailureReason.lost_worker.value and "lease expired" in events[2][4]
    assert done.failures == 1
    view = assert_one_trainer_at_a_time(stack, run)
    assert view.pids[trainer].last < killed_at + 10
    _steps_once(stack, run, 100)
    assert_exactly_once(stack, run, real=False)
    report(stack, run)
    stack.forget(run)


def _cancel(stack: Stack, run) -> None:
    from service import runs

    with stack.db.session() as session:
        try:
            runs.request_cancel(session, run.id, "fault suite: cleaning up")
        except runs.InvalidTransition:  # it finished meanwhile: nothing to clean up
            return
    stack.wait_done(run, timeout=60)


def test_sigstop_of_a_worker_inside_a_transaction(stack):
    """A worker frozen (SIGSTOP) while it is inside a database transaction that locks its
    run's row (a heartbeat, metric rows being stored): the lease must still expire and the run
    move to the other worker; a row lock held by a frozen client must not wedge the
    reconciler (``service.db`` sets ``idle_in_transaction_session_timeout``). The worker is
    stopped while its metric write waits on a table lock the test holds (``Stack.freeze``), so
    it is frozen inside its transaction every time, whatever the machine's speed."""
    _stub(stack)
    run = stack.submit(steps=300, save_interval=10, name=new_name("sigstop-tx"))
    running = stack.wait_status(run, S.running, 60, "the run to start")
    a = stack.worker_of(running)
    stack.wait_checkpoint_recorded(run, 10)
    try:
        tries = stack.freeze(a, run, in_transaction=True)
        frozen_at = time.time()
        moved = wait_for(
            lambda: (r := stack.run(run.id)).attempt >= 2 and r,
            2 * LEASE,
            "the run to move to the other worker while the frozen worker holds a row lock",
            on_fail=lambda: stack.pg.activity(),
        )
        assert not moved.worker_id.endswith(a.worker_id_suffix)
    except AssertionError:
        os.kill(a.pid, signal.SIGCONT)
        _cancel(stack, run)  # leave the workers idle for the next case
        raise
    finally:
        os.kill(a.pid, signal.SIGCONT)
    done = stack.wait_done(run, timeout=120)

    assert done.status == S.succeeded, done.failure_message
    events = stack.events(run)
    assert events[2][2] == FailureReason.lost_worker.value
    assert_one_trainer_at_a_time(stack, run)
    _steps_once(stack, run, 300)
    assert_exactly_once(stack, run, real=False)
    all_workers_alive(stack)
    report(
        stack, run, tries=tries, requeued_after_s=round(stack.event_times(run)[2] - frozen_at, 2)
    )
    stack.forget(run)


def test_redis_restarted_with_runs_queued_and_running(stack):
    """Two runs training and one waiting in the broker when Redis restarts (no persistence:
    the waiting message is lost): the running ones finish undisturbed, the lost one is sent
    again by the reconciler; each trains once."""
    _stub(stack)
    first = [
        stack.submit(steps=120, save_interval=20, name=new_name(f"redis-run{i}")) for i in (1, 2)
    ]
    for run in first:
        stack.wait_status(run, S.running, 60, f"{run.name} to start")
    waiting = stack.submit(steps=40, save_interval=20, name=new_name("redis-queued"))
    assert stack.run(waiting.id).status == S.queued
    stack.redis.restart()
    done = [stack.wait_done(run, timeout=150) for run in (*first, waiting)]

    for run, final in zip((*first, waiting), done, strict=True):
        assert final.status == S.succeeded, (run.name, final.failure_message)
        assert final.attempt == 1 and final.failures == 0, run.name
        assert _transitions(stack, run) == [
            (None, "queued"),
            ("queued", "running"),
            ("running", "succeeded"),
        ], run.name
        assert_one_trainer_at_a_time(stack, run)
        _steps_once(stack, run, 120 if run in first else 40)
        assert_exactly_once(stack, run, real=False)
        report(stack, run)
    all_workers_alive(stack)
    for run in (*first, waiting):
        stack.forget(run)


def test_postgres_restarted_and_stopped_while_metrics_stream(stack):
    """PostgreSQL restarted (down for a moment) and then stopped for longer than a lease
    while a run streams metric rows: rows buffered in the worker reach the database, the
    trainer stops itself when its worker can no longer vouch for the lease, the run resumes
    from its checkpoint once the database is back, and every row and checkpoint is there
    once."""
    _stub(stack)
    run = stack.submit(steps=240, save_interval=10, name=new_name("postgres"))
    stack.wait_status(run, S.running, 60, "the run to start")
    stack.wait_checkpoint_recorded(run, 10)

    def metric_rows() -> int:
        from sqlalchemy.exc import SQLAlchemyError

        from service import reads

        try:
            with stack.db.session() as session:
                return len(reads.list_metrics(session, run.id))
        except SQLAlchemyError:
            return -1

    before = metric_rows()
    stack.pg.restart()
    wait_for(
        lambda: metric_rows() > before + 10,
        60,
        "metric rows after the restart",
        on_fail=stack.on_fail(run),
    )
    stack.pg.stop()
    time.sleep(LEASE + 1)
    stack.pg.start()
    done = stack.wait_done(run, timeout=180)

    assert done.status == S.succeeded, done.failure_message
    assert_one_trainer_at_a_time(stack, run)
    _steps_once(stack, run, 240)
    assert_exactly_once(stack, run, real=False)
    all_workers_alive(stack)
    report(stack, run)
    stack.forget(run)


# -- the real engine -------------------------------------------------------------------------------


def test_kill_9_of_a_trainer(stack):
    """The training process of a tiny real MoE run is killed (SIGKILL) after a checkpoint:
    the attempt fails as killed (retryable, one failure), the run resumes from the newest
    checkpoint in a new training process and succeeds."""
    _real(stack)
    steps = 120
    run = stack.submit(steps=steps, save_interval=20, name=new_name("kill-trainer"))
    out = stack.out_dir(run)
    wait_for(
        lambda: (out / "step-00000020").is_dir(),
        240,
        "the first checkpoint on disk",
        poll=0.01,
        on_fail=stack.on_fail(run),
    )
    trainer = stack.trainer_pid(run)
    os.kill(trainer, signal.SIGKILL)
    done = stack.wait_done(run, timeout=240)

    assert done.status == S.succeeded, done.failure_message
    assert done.attempt == 2 and done.failures == 1
    events = stack.events(run)
    assert [(f, t) for f, t, *_ in events] == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
    ]
    assert events[2][2] == FailureReason.killed.value
    view = assert_one_trainer_at_a_time(stack, run)
    assert trainer in view.pids and len(view.pids) == 2
    _steps_once(stack, run, steps)
    assert_exactly_once(stack, run, real=True)
    report(stack, run)
    stack.forget(run)


def test_sigstop_of_a_worker_past_its_lease(stack):
    """The key case. The worker process (not its training) is frozen with SIGSTOP for longer
    than its lease. Its training process must stop itself (its worker no longer vouches for
    the lease) before the reconciler can hand the run to the other worker; that worker
    resumes it from the newest checkpoint and succeeds. At no sampled moment are two
    training processes of the run alive, and no checkpoint is written twice."""
    _real(stack)
    # long enough that an unfenced training would still be running when the run is handed
    # over (about LEASE + LEASE/2 seconds after the freeze)
    steps = 500
    run = stack.submit(steps=steps, save_interval=25, name=new_name("sigstop"))
    out = stack.out_dir(run)
    wait_for(
        lambda: (out / "step-00000025").is_dir(),
        240,
        "the first checkpoint on disk",
        poll=0.01,
        on_fail=stack.on_fail(run),
    )
    running = stack.run(run.id)
    assert running.status == S.running and running.attempt == 1
    a = stack.worker_of(running)
    trainer_a = stack.trainer_pid(run)
    try:
        # frozen outside a database transaction: test_sigstop_of_a_worker_inside_a_transaction
        # is the other case
        stack.freeze(a, run, in_transaction=False)
        frozen_at = time.time()
        # the frozen worker's training stops itself: a zombie (its parent cannot reap it)
        wait_for(
            lambda: trainer_a not in stack.sampler.alive_in(stack.run_dir(run)),
            LEASE,
            "the frozen worker's training to stop itself",
            on_fail=stack.on_fail(run),
        )
        fenced_after = time.time() - frozen_at
        moved = wait_for(
            lambda: (r := stack.run(run.id)).attempt >= 2 and r.status == S.running and r,
            60,
            "the other worker to claim the run",
            on_fail=stack.on_fail(run),
        )
        b = stack.worker_of(moved)
        assert b is not a
        trainer_b = stack.trainer_pid(run, other_than={trainer_a})
        # let B train past its resume point while A is still frozen
        last_a = max((contract.checkpoint_step(p.name) or 0) for p in out.glob("step-*"))
        wait_for(
            lambda: any(
                (contract.checkpoint_step(p.name) or 0) > last_a for p in out.glob("step-*")
            ),
            120,
            "a checkpoint of the second attempt",
            poll=0.05,
            on_fail=stack.on_fail(run),
        )
    finally:
        os.kill(a.pid, signal.SIGCONT)
    done = stack.wait_done(run, timeout=240)

    assert done.status == S.succeeded, done.failure_message
    assert done.attempt == 2 and done.worker_id.endswith(b.worker_id_suffix)
    events = stack.events(run)
    assert [(f, t) for f, t, *_ in events] == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
    ]
    assert events[2][2] == FailureReason.lost_worker.value and done.failures == 1
    view = assert_one_trainer_at_a_time(stack, run)
    assert set(view.pids) == {trainer_a, trainer_b}
    # A's training was gone before the reconciler re-queued the run (its lease expired), so
    # before B's training started
    requeued_at = stack.event_times(run)[2]
    assert view.pids[trainer_a].last < requeued_at < view.pids[trainer_b].first
    assert fenced_after < LEASE
    fenced = [
        e for e in contract.read_events(out, attempt=1) if e.event == contract.EventKind.fenced
    ]
    assert fenced, "the first attempt's training did not record that it fenced itself"
    _steps_once(stack, run, steps)
    assert_exactly_once(stack, run, real=True)
    all_workers_alive(stack)  # A woke up, found its lease gone, and carries on
    report(
        stack,
        run,
        fenced_after_s=round(fenced_after, 2),
        requeued_after_s=round(requeued_at - frozen_at, 2),
    )
    stack.forget(run)


def test_a_full_disk_fails_as_no_space(stack):
    """RUNS_DIR is a tmpfs filled up to a few MiB: the first checkpoint of a tiny real run
    does not fit (ENOSPC inside torch.save). The run fails at once as no_space (permanent:
    not retried), the message names the path; no partial checkpoint is left or recorded."""
    if stack.tmpfs_problem:
        pytest.skip(f"RUNS_DIR is not a tmpfs: {stack.tmpfs_problem}")
    _real(stack)
    run = stack.submit(steps=40, save_interval=2, name=new_name("full-disk"), enqueue=False)
    ballast = stack.runs_dir / "ballast"
    free = shutil.disk_usage(stack.runs_dir).free
    keep = int(2.5 * 2**20)  # weights (1.4 MiB) fit, the optimizer state (2.8 MiB) does not
    with open(ballast, "wb") as fh:
        fh.truncate(0)
        chunk = b"\0" * 2**20
        left = free - keep
        while left > 0:
            fh.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
    try:
        assert enqueue_run(stack.app, run.id).ok
        done = stack.wait_done(run, timeout=240)
        assert done.status == S.failed, done.failure_message
        assert done.failure_reason == FailureReason.no_space, done.failure_message
        assert str(stack.out_dir(run)) in (done.failure_message or "")
        assert done.attempt == 1
        assert _transitions(stack, run) == [
            (None, "queued"),
            ("queued", "running"),
            ("running", "failed"),
        ]
        assert_one_trainer_at_a_time(stack, run)
        assert_exactly_once(stack, run, real=True)
        assert not stack.recorded_checkpoints(run)
        report(stack, run, message=done.failure_message)
    finally:
        ballast.unlink(missing_ok=True)
    all_workers_alive(stack)
    stack.forget(run)
