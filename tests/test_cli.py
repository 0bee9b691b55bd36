"""`manage.py sagas`: operators list, inspect, retry, abort and re-drive sagas from a shell, with
the services the staff API and the admin use, on a real worker."""

import json
import re
import subprocess
import sys
import uuid
from datetime import timedelta
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.utils import timezone

from sagas import dispatch
from sagas.models import Direction, FaultKind, SagaInstance, SagaState, StepState
from sagas.services import saga_start
from sagas.testing import inject_fault, subprocess_environment, timeline, wait_for_saga
from tests.engine_helpers import compensations_in_start_order, effects, step_row, wait_for_step_in_hand
from tests.orders_helpers import a_staff_user
from tests.sagaapp.sagas import STEP_NAMES, four_steps, versioned_v1

pytestmark = pytest.mark.django_db(transaction=True)

F, C = Direction.FORWARD, Direction.COMPENSATE
VIEW, RETRY, ABORT, REDRIVE = "sagas.view_sagainstance", "sagas.retry_saga", "sagas.abort_saga", "sagas.redrive_saga"
WIDTH = 100
# A timeline row: #, step, dir, state, attempts, deliveries, started, finished, took.
ROW = re.compile(r"^  +(\d+|-)  +(\S+)  +(fwd|undo)  +([A-Z]+)  +(\d+)  +(\d+)  +(\S+)  +(\S+)  +(.+)$")
MS = re.compile(r"^\d\d:\d\d:\d\d\.\d{3}$")


def sagas(*args: str) -> str:
    out = StringIO()
    call_command("sagas", *args, "--width", str(WIDTH), stdout=out)
    return out.getvalue()


def sagas_json(*args: str):
    return json.loads(sagas(*args, "--json"))


def listed(*args: str) -> list[str]:
    return [row["id"] for row in sagas_json("list", *args)]


def refused(*args: str) -> str:
    """The message of the CommandError the command raises."""
    with pytest.raises(CommandError) as error:
        sagas(*args)
    return str(error.value)


def timeline_rows(output: str) -> list[tuple[str, ...]]:
    return [match.groups() for line in output.splitlines() if (match := ROW.match(line))]


def an_operator(*permissions: str) -> str:
    return a_staff_user("ops", permissions=(VIEW, *permissions)).username


def a_stuck_saga(monkeypatch, *, started_at=None) -> SagaInstance:
    """Started at `started_at` (an hour ago), its first message lost on the way (never sent): past
    its stuck_after, as the sweeper would find it."""
    with monkeypatch.context() as lost:
        lost.setattr(dispatch, "send_forward", lambda *args, **kwargs: None)
        return saga_start(definition=four_steps, input={}, now=started_at or timezone.now() - timedelta(hours=1))


def a_compensated_saga() -> SagaInstance:
    inject_fault(four_steps.name, "ship", kind=FaultKind.BUSINESS)
    saga = wait_for_saga(four_steps.start(input={}).id)
    assert saga.state == SagaState.COMPENSATED, timeline(saga.id)
    return saga


def a_failed_saga():
    """FAILED: ship refused, then charge's compensation kept failing. Returns it and that fault."""
    inject_fault(four_steps.name, "ship", kind=FaultKind.BUSINESS)
    stubborn = inject_fault(four_steps.name, "charge", kind=FaultKind.TRANSIENT, times=None, direction=C)
    saga = wait_for_saga(four_steps.start(input={}).id)
    assert saga.state == SagaState.FAILED, timeline(saga.id)
    return saga, stubborn


def manage(*args: str) -> subprocess.CompletedProcess:
    """`python manage.py ...` as an operator runs it, on the test database."""
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=settings.BASE_DIR, env=subprocess_environment(),
        capture_output=True, text=True, timeout=60,
    )


# --- list -------------------------------------------------------------------------------------------


def test_list_shows_sagas_newest_first_and_filters_by_state_name_stuck_and_failure(saga_worker, monkeypatch):
    stuck = a_stuck_saga(monkeypatch)
    completed = wait_for_saga(four_steps.start(input={}).id)
    compensated = a_compensated_saga()
    failed, _ = a_failed_saga()
    other_name = wait_for_saga(versioned_v1.start(input={}).id)

    everything = listed()
    text = sagas("list")

    assert everything == [str(s.id) for s in (other_name, failed, compensated, completed, stuck)]
    assert listed("--state", "COMPENSATED") == [str(compensated.id)]
    assert listed("--failed") == [str(failed.id)]
    assert listed("--name", "test_versioned") == [str(other_name.id)]
    assert listed("--stuck") == [str(stuck.id)]
    assert listed("--stuck", "--name", "test_versioned") == []
    assert listed("--state", "COMPLETED", "--name", four_steps.name) == [str(completed.id)]
    assert all(len(line) <= WIDTH for line in text.splitlines()), text
    [failed_line] = [line for line in text.splitlines() if line.startswith(str(failed.id))]
    assert re.search(r"test_four_steps v1 +FAILED +\d+s +undo charge: Inj", failed_line), failed_line
    assert "InjectedTransientError" in sagas_json("list", "--failed")[0]["failure_reason"]


def test_list_reads_bounded_pages_that_go_on_with_before_without_gaps_or_repeats(monkeypatch):
    now = timezone.now()
    started = [a_stuck_saga(monkeypatch, started_at=now - timedelta(minutes=m)) for m in (5, 4, 4, 4, 3, 2, 1)]
    newest_first = sorted(started, key=lambda s: (s.created_at, s.id), reverse=True)  # three share created_at

    pages, before = [], []
    while page := listed("--limit", "3", *before):
        pages.append(page)
        before = ["--before", page[-1]]
    first_page = sagas("list", "--limit", "3")

    assert [len(page) for page in pages] == [3, 3, 1]
    assert [saga_id for page in pages for saga_id in page] == [str(s.id) for s in newest_first]
    assert f"--before {pages[0][-1]}" in first_page.splitlines()[-1]


# --- show ---------------------------------------------------------------------------------------------


def test_show_prints_a_completed_saga_with_each_step_to_the_millisecond_its_duration_and_result(saga_worker):
    saga = wait_for_saga(four_steps.start(input={"customer": "c-42"}).id)

    output = sagas("show", str(saga.id))
    detail = sagas_json("show", str(saga.id))

    assert output.splitlines()[0] == f"saga {saga.id}  test_four_steps v1  COMPLETED"
    assert "registered here" in output and '{"customer": "c-42"}' in output
    assert all(len(line) <= WIDTH for line in output.splitlines()), output
    rows = timeline_rows(output)
    assert [(row[1], row[2], row[3], row[4], row[5]) for row in rows] == [(name, "fwd", "COMPLETED", "1", "1") for name in STEP_NAMES]
    for _, _, _, _, _, _, started, finished, took in rows:
        assert MS.match(started) and MS.match(finished) and started <= finished
        assert re.fullmatch(r"\d+ ms|\d+\.\d{3} s", took), took
    assert re.search(rf'^ +result: {{"attempt": 1, "key": "{saga.id}:charge",', output, re.M), output
    assert len(re.findall(r"^  \S+ fwd +\|[ =]+\|$", output, re.M)) == 4, "one bar per step in the picture"
    assert [(s["name"], s["state"], s["result"]["step"]) for s in detail["steps"]] == [(n, "COMPLETED", n) for n in STEP_NAMES]
    assert all(s["duration_ms"] is not None and s["duration_ms"] >= 0 for s in detail["steps"])
    assert detail["definition_registered"] is True and detail["stuck"] is False


def test_show_prints_a_compensated_saga_with_its_failure_reason_failed_step_and_compensations(saga_worker):
    saga = a_compensated_saga()

    output = sagas("show", str(saga.id))
    detail = sagas_json("show", str(saga.id))

    assert all(len(line) <= WIDTH for line in output.splitlines()), output
    assert re.search(r"^  failure +step ship failed: InjectedBusinessError", output, re.M), output
    rows = [(row[0], row[1], row[2], row[3]) for row in timeline_rows(output)]
    assert rows == [
        ("1", "reserve", "fwd", "COMPLETED"),
        ("2", "charge", "fwd", "COMPLETED"),
        ("3", "ship", "fwd", "FAILED"),
        ("4", "charge", "undo", "COMPLETED"),
        ("5", "reserve", "undo", "COMPLETED"),
        ("-", "notify", "fwd", "PENDING"),
    ]
    assert re.search(r"^ +error: +InjectedBusinessError", output, re.M), output
    assert [(s["name"], s["direction"]) for s in detail["steps"]][3:5] == [("charge", C), ("reserve", C)]
    assert detail["steps"][2]["error"].startswith("InjectedBusinessError")
    assert detail["steps"][5]["started_at"] is None and detail["steps"][5]["duration_ms"] is None


# --- retry, abort, redrive ------------------------------------------------------------------------------


def test_retry_of_a_failed_saga_runs_its_compensations_again_on_the_worker(saga_worker):
    saga, stubborn = a_failed_saga()
    a_staff_user("viewer", permissions=(VIEW, ABORT))
    operator = an_operator(RETRY)
    stubborn.delete()

    refused_to_viewer = refused("retry", str(saga.id), "--user", "viewer")
    refused_to_nobody = refused("retry", str(saga.id))
    state_after_refusals = SagaInstance.objects.get(pk=saga.id).state
    output = sagas("retry", str(saga.id), "--user", operator)
    saga = wait_for_saga(saga.id)

    assert "viewer may not retry sagas" in refused_to_viewer and RETRY in refused_to_viewer
    assert "--user" in refused_to_nobody
    assert state_after_refusals == SagaState.FAILED
    assert output.strip() == f"saga {saga.id}: compensation retried, now COMPENSATING"
    assert saga.state == SagaState.COMPENSATED, timeline(saga.id)
    assert effects(saga.id)[-2:] == [("charge", C), ("reserve", C)]
    assert listed("--failed") == []


@pytest.mark.services(
    reason="after the running step commits, the abort and the next step race for SQLite's write lock "
    "(PostgreSQL queues row locks first come, first served); either outcome is safe"
)
def test_abort_of_a_running_saga_waits_for_the_step_in_hand_then_compensates_on_the_worker(saga_worker, monkeypatch):
    monkeypatch.setenv("CHAINSAGA_OPERATOR", an_operator(ABORT))
    saga = four_steps.start(input={"sleep": {"ship": 1.5}})
    wait_for_step_in_hand(saga_worker, saga.id, "ship")

    output = sagas("abort", str(saga.id), "--reason", "customer called")
    saga = wait_for_saga(saga.id)

    assert output.strip() == f"saga {saga.id}: aborted, now COMPENSATING"
    assert saga.state == SagaState.COMPENSATED, timeline(saga.id)
    assert saga.failure_reason == "aborted by ops from the command line: customer called"
    assert compensations_in_start_order(saga.id) == ["ship", "charge", "reserve"]


def test_abort_of_a_stuck_saga_compensates_it_and_it_leaves_the_stuck_list(saga_worker, monkeypatch):
    stuck = a_stuck_saga(monkeypatch)
    operator = an_operator(ABORT)
    listed_before = listed("--stuck")

    output = sagas("abort", str(stuck.id), "--user", operator, "--json")
    saga = wait_for_saga(stuck.id)

    assert listed_before == [str(stuck.id)]
    assert json.loads(output)["id"] == str(stuck.id)
    assert saga.state == SagaState.COMPENSATED, "nothing had completed: nothing to undo"
    assert saga.failure_reason == "aborted by ops from the command line"
    assert listed("--stuck") == []


def test_redrive_sends_a_stuck_saga_on_and_it_completes_on_the_worker(saga_worker, monkeypatch):
    stuck = a_stuck_saga(monkeypatch)
    a_staff_user("retrier", permissions=(VIEW, RETRY))
    operator = an_operator(REDRIVE)

    refused_to_retrier = refused("redrive", str(stuck.id), "--user", "retrier")
    output = sagas("redrive", str(stuck.id), "--user", operator)
    saga = wait_for_saga(stuck.id)

    assert REDRIVE in refused_to_retrier
    assert output.strip() == f"saga {stuck.id}: re-driven (re-drive 1), now PENDING"
    assert saga.state == SagaState.COMPLETED, timeline(saga.id)
    assert saga.redrives == 1
    assert effects(saga.id) == [(name, F) for name in STEP_NAMES]
    assert (step_row(saga.id, "reserve").deliveries, step_row(saga.id, "reserve").state) == (1, StepState.COMPLETED)
    assert listed("--stuck") == []


# --- versions ------------------------------------------------------------------------------------------


def test_versions_counts_sagas_in_flight_per_name_and_version_and_says_which_are_registered(saga_worker, monkeypatch):
    for _ in range(2):
        a_stuck_saga(monkeypatch)
    stranded = a_stuck_saga(monkeypatch)
    SagaInstance.objects.filter(pk=stranded.pk).update(version=99)  # as if a deploy dropped v99
    wait_for_saga(four_steps.start(input={}).id)  # finished: not in flight

    rows = {(v["name"], v["version"]): v for v in sagas_json("versions")}
    text = manage("sagas", "versions")  # the system check fails on v99; the operator's tool still runs

    assert (rows[(four_steps.name, 1)]["in_flight"], rows[(four_steps.name, 1)]["registered"]) == (2, True)
    assert rows[(four_steps.name, 1)]["states"] == {"PENDING": 2}
    assert (rows[(four_steps.name, 99)]["in_flight"], rows[(four_steps.name, 99)]["registered"]) == (1, False)
    assert rows[(versioned_v1.name, 1)]["in_flight"] == 0 and rows[(versioned_v1.name, 1)]["registered"] is True
    assert text.returncode == 0, text.stderr
    assert re.search(r"^test_four_steps +99 +NO +1 +0 +1 PENDING +STRANDED", text.stdout, re.M), text.stdout
    assert "test_four_steps v99 is NOT registered in this process" in sagas("show", str(stranded.id))
    assert "is not registered in this deployment" in refused("abort", str(stranded.id), "--user", an_operator(ABORT))


# --- refusals ------------------------------------------------------------------------------------------


def test_each_refusal_is_a_command_error_naming_the_problem(saga_worker):
    completed = str(wait_for_saga(four_steps.start(input={}).id).id)
    operator = an_operator(RETRY, ABORT, REDRIVE)
    unknown = str(uuid.uuid4())

    messages = {
        "bad id": refused("show", "not-a-saga"),
        "unknown": refused("show", unknown),
        "unknown to act on": refused("abort", unknown, "--user", operator),
        "unknown page start": refused("list", "--before", unknown),
        "retry not FAILED": refused("retry", completed, "--user", operator),
        "abort COMPLETED": refused("abort", completed, "--user", operator),
        "redrive COMPLETED": refused("redrive", completed, "--user", operator),
        "no such user": refused("retry", completed, "--user", "ghost"),
        "limit": refused("list", "--limit", "0"),
    }

    assert messages == {
        "bad id": "'not-a-saga' is not a saga id: give the UUID that `sagas list` shows",
        "unknown": f"no saga {unknown}",
        "unknown to act on": f"no saga {unknown}",
        "unknown page start": f"no saga {unknown}",
        "retry not FAILED": f"saga {completed} is COMPLETED; only a FAILED saga's compensation can be retried",
        "abort COMPLETED": f"saga {completed} cannot be aborted: it COMPLETED; there is nothing to abort",
        "redrive COMPLETED": f"saga {completed} cannot be re-driven: it is COMPLETED; nothing is left to send",
        "no such user": "no user 'ghost'",
        "limit": "--limit must be between 1 and 1000",
    }
    assert SagaInstance.objects.get(pk=completed).state == SagaState.COMPLETED


def test_from_the_shell_a_refusal_is_one_line_on_stderr_and_exit_status_1(saga_worker):
    completed = str(wait_for_saga(four_steps.start(input={}).id).id)
    operator = an_operator(RETRY)

    bad_id = manage("sagas", "show", "42")
    not_failed = manage("sagas", "retry", completed, "--user", operator)

    assert (bad_id.returncode, bad_id.stdout, bad_id.stderr) == (1, "", "CommandError: '42' is not a saga id: give the UUID that `sagas list` shows\n")
    assert (not_failed.returncode, not_failed.stdout) == (1, "")
    assert not_failed.stderr == f"CommandError: saga {completed} is COMPLETED; only a FAILED saga's compensation can be retried\n"
