"""The chaos soak's harder faults, apart from the schedule that fires them (perf.chaos): freezing
processes, finding a worker in the middle of a transaction that holds row locks, forging step
messages the saga log did not ask for. Imported after django.setup()."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from django.db import connection

from sagas.definition import get_definition
from sagas.models import SagaInstance, SagaState, StepExecution, StepState


def stop_processes(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass


def resume_processes(pids: list[int]) -> None:
    for pid in reversed(pids):
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def freeze_for(pids: list[int], *, seconds: float) -> None:
    """SIGSTOP every process in `pids` for `seconds`, then SIGCONT (also when interrupted)."""
    stop_processes(pids)
    try:
        time.sleep(seconds)
    finally:
        resume_processes(pids)


# --- a worker holding row locks ---------------------------------------------------------------------


def tcp_client_ports(pid: int, remote_port: int) -> list[int]:
    """The local ports of the TCP connections process `pid` holds to 127.0.0.1:`remote_port`: what
    PostgreSQL's pg_stat_activity.client_port shows for its sessions."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:  # the process exited meanwhile
        return []
    ports = []
    for line in lines:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if inode in inodes and int(remote.split(":")[1], 16) == remote_port:
            ports.append(int(local.split(":")[1], 16))
    return ports


def sessions_holding_locks(client_ports) -> dict[int, tuple[str, list[str]]]:
    """client port -> (transaction id, the tables it locked rows of or wrote to) for the sessions
    among `client_ports` inside a transaction that wrote or locked rows (it has a transaction id)."""
    if not client_ports:
        return {}
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT a.client_port, a.backend_xid::text, array_remove(array_agg(DISTINCT c.relname::text), NULL) "
            "FROM pg_stat_activity a "
            "LEFT JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'relation' AND l.mode IN ('RowShareLock', 'RowExclusiveLock') "
            "LEFT JOIN pg_class c ON c.oid = l.relation AND c.relkind = 'r' "
            "WHERE a.backend_xid IS NOT NULL AND a.client_port = ANY(%s) GROUP BY a.client_port, a.backend_xid::text",
            [list(client_ports)],
        )
        return {port: (xid, sorted(tables)) for port, xid, tables in cursor.fetchall()}


def freeze_a_worker_holding_locks(workers, *, pg_port: int, prefer: str, within: float = 20.0) -> tuple[int, str]:
    """SIGSTOP the whole process group of one of `workers` (sagas.testing.CeleryWorker) at a moment
    when one of its pool children is inside a transaction holding row locks (checked again once it
    is stopped): for the first half of `within` seconds only a transaction that locked rows of the
    table `prefer`, then any. Returns (the worker's index, what its child holds); RuntimeError if
    none was caught in time."""
    started = time.monotonic()
    tries = 0
    while time.monotonic() - started < within:
        ports = {
            port: (n, child)
            for n, worker in enumerate(workers) if worker.alive
            for child in worker.children()
            for port in tcp_client_ports(child, pg_port)
        }
        choosy = time.monotonic() - started < within / 2
        holding = {port: held for port, held in sessions_holding_locks(ports).items() if not choosy or prefer in held[1]}
        if holding:
            port, (xid, _) = next(iter(holding.items()))
            n, child = ports[port]
            tries += 1
            os.killpg(workers[n].process.pid, signal.SIGSTOP)
            still = sessions_holding_locks([port]).get(port)
            if still and still[0] == xid:
                return n, f"pool child {child} is in transaction {xid} holding rows of {', '.join(still[1]) or 'no table'} (caught at try {tries})"
            os.killpg(workers[n].process.pid, signal.SIGCONT)  # it committed in between: try again
        time.sleep(0.005)
    raise RuntimeError(f"no worker was caught inside a transaction holding locks in {within:g} s ({tries} near misses)")


# --- forged step messages ------------------------------------------------------------------------------


def forge_step_messages(sagas: list[SagaInstance]) -> list[tuple[str, str, str]]:
    """For each running saga: its last forward step, out of order (an earlier step has not
    completed), and the compensation of a step that has not completed, as `sagas.run_step`
    messages the saga log never asked for (issue 9, case 2). Returns (saga id, step, direction)."""
    from celery import current_app

    sent = []
    for saga in sagas:
        definition = get_definition(saga.name, saga.version)
        pending = list(
            StepExecution.objects.filter(saga=saga, direction="forward").exclude(state=StepState.COMPLETED)
            .order_by("position").values_list("name", flat=True)
        )
        if not pending:
            continue
        forged = [(pending[0], "compensate")]
        if pending[0] != definition.steps[-1].name:  # else the real next message is due: no forgery
            forged.append((definition.steps[-1].name, "forward"))
        for step, direction in forged:
            current_app.send_task("sagas.run_step", kwargs={"saga_id": str(saga.id), "step": step, "direction": direction})
            sent.append((str(saga.id), step, direction))
    return sent


def running_sagas(*, limit: int, rng, wait: float = 15.0) -> list[SagaInstance]:
    """Up to `limit` sagas that are RUNNING forward with steps still to go, as soon as there is at
    least one (polling for up to `wait` seconds: at a few orders a second most sagas finish in a
    fraction of one). Every saga in the soak's database is one of its orders'."""
    deadline = time.monotonic() + wait
    while True:
        candidates = list(
            SagaInstance.objects.filter(state=SagaState.RUNNING, steps__direction="forward", steps__state=StepState.PENDING)
            .distinct()[:200]
        )
        if candidates or time.monotonic() > deadline:
            return rng.sample(candidates, min(limit, len(candidates)))
        time.sleep(0.01)
