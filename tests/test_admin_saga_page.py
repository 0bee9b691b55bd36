"""The saga's admin page as an operator uses it, after sagas ran on a real worker: times to the
millisecond, durations, input, each step's result and idempotency key, the failure reason, the
timeline picture (a bar per step and compensation that ran, retries and lost deliveries shown),
and the retry and abort buttons (confirmation page, POST, permission-checked). And the admin
index's "needs attention" panel, each line linking to its filtered list."""

import re

import pytest
from django.test import Client
from django.urls import reverse

from sagas.models import Direction, Fault, FaultKind, SagaInstance, SagaState, StepExecution
from sagas.permissions import ABORT_SAGA, REDRIVE_SAGA, RETRY_SAGA
from sagas.testing import inject_fault, timeline, wait_for_saga
from tests.orders_helpers import a_staff_user
from tests.sagaapp.sagas import four_steps

pytestmark = pytest.mark.django_db(transaction=True)

F, C = Direction.FORWARD, Direction.COMPENSATE
VIEW = "sagas.view_sagainstance"
MILLISECONDS = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}")


def page_of(client, saga) -> str:
    response = client.get(reverse("admin:sagas_sagainstance_change", args=[saga.pk]))
    assert response.status_code == 200
    return response.content.decode()


def logged_in(*permissions, name="ops") -> Client:
    client = Client()
    client.force_login(a_staff_user(name, permissions=(VIEW, *permissions)))
    return client


def bars(html: str) -> list[tuple[str, str, str]]:
    """(step, direction, state) of each bar of the timeline picture."""
    return re.findall(r'<rect class="timeline-bar" data-step="(\w+)" data-direction="(\w+)" data-state="(\w+)"', html)


def test_the_page_of_a_compensated_saga_tells_its_whole_story(saga_worker):
    inject_fault(four_steps.name, "charge", kind=FaultKind.TRANSIENT, times=1)
    inject_fault(four_steps.name, "ship", kind=FaultKind.BUSINESS)
    saga = wait_for_saga(four_steps.start(input={"order": "o-42", "amount": "19.99"}).id)
    assert saga.state == SagaState.COMPENSATED, timeline(saga.id)

    html = page_of(logged_in(), saga)

    assert bars(html) == [
        ("reserve", F, "completed"), ("charge", F, "completed"), ("ship", F, "failed"),
        ("charge", C, "completed"), ("reserve", C, "completed"),
    ], "one bar per step and compensation that ran, in the order they started"
    assert "2 attempts" in html, "the retried charge says so beside its bar"
    assert len(MILLISECONDS.findall(html)) >= 3 + 2 * 5, "the saga's and every step's times to the millisecond"
    assert re.search(r"\d+\.\d ms", html), "durations"
    assert "o-42" in html and "19.99" in html, "the input"
    assert f"{saga.id}:charge" in html, "each step's idempotency key"
    charge = StepExecution.objects.get(saga=saga, name="charge", direction=F)
    assert charge.result and str(charge.result["attempt"]) in html, "each step's result"
    assert "step ship failed" in html and "InjectedBusinessError" in html, "the failure reason"


def test_lost_deliveries_show_in_red_beside_the_bar_and_in_the_table(saga_worker):
    saga = wait_for_saga(four_steps.start(input={}).id)
    StepExecution.objects.filter(saga=saga, name="charge", direction=F).update(deliveries=3)  # two deliveries died unfinished

    html = page_of(logged_in(), saga)

    assert "2 lost deliveries" in html and "(2 lost)" in html


def test_a_failed_saga_is_retried_from_its_page_after_a_confirmation(saga_worker):
    inject_fault(four_steps.name, "ship", kind=FaultKind.BUSINESS)
    stubborn = inject_fault(four_steps.name, "charge", kind=FaultKind.TRANSIENT, times=None, direction=C)
    saga = wait_for_saga(four_steps.start(input={}).id)
    assert saga.state == SagaState.FAILED, timeline(saga.id)
    Fault.objects.filter(pk=stubborn.pk).delete()  # the cause is fixed
    operator = logged_in(RETRY_SAGA, ABORT_SAGA)
    operate = reverse("admin:sagas_sagainstance_operate", args=[saga.pk, "retry"])

    assert f'href="{operate}"' in page_of(operator, saga), "the retry button"
    assert "abort/" not in page_of(operator, saga), "a FAILED saga offers no abort"
    confirmation = operator.get(operate)
    assert confirmation.status_code == 200 and b"Yes, retry compensation" in confirmation.content
    assert SagaInstance.objects.get(pk=saga.pk).state == SagaState.FAILED, "a GET changes nothing"
    done = operator.post(operate, follow=True)

    assert done.redirect_chain[-1][0] == reverse("admin:sagas_sagainstance_change", args=[saga.pk])
    assert b"retry done" in done.content
    assert wait_for_saga(saga.id, states=[SagaState.COMPENSATED]).state == SagaState.COMPENSATED


def test_the_buttons_need_their_permission(saga_worker):
    inject_fault(four_steps.name, "ship", kind=FaultKind.BUSINESS)
    inject_fault(four_steps.name, "charge", kind=FaultKind.TRANSIENT, times=None, direction=C)
    saga = wait_for_saga(four_steps.start(input={}).id)
    viewer = logged_in(name="viewer")
    operate = reverse("admin:sagas_sagainstance_operate", args=[saga.pk, "retry"])

    assert "/operate/" not in page_of(viewer, saga)
    assert viewer.get(operate).status_code == 403
    assert viewer.post(operate).status_code == 403
    assert SagaInstance.objects.get(pk=saga.pk).state == SagaState.FAILED


def test_abort_from_the_page_compensates_a_running_saga():
    """No worker: the saga stays RUNNING-able (PENDING) with its messages parked."""
    saga = four_steps.start(input={})
    operator = logged_in(ABORT_SAGA)
    operate = reverse("admin:sagas_sagainstance_operate", args=[saga.pk, "abort"])

    assert f'href="{operate}"' in page_of(operator, saga)
    operator.post(operate)

    saga.refresh_from_db()
    assert saga.state in (SagaState.COMPENSATING, SagaState.COMPENSATED) and "aborted by" in saga.failure_reason


def test_redrive_from_the_page_sends_what_comes_next_again():
    """No worker: the first step's message waits in the parked queue; a re-drive sends it again."""
    saga = four_steps.start(input={})
    viewer, operator = logged_in(name="viewer"), logged_in(REDRIVE_SAGA)
    operate = reverse("admin:sagas_sagainstance_operate", args=[saga.pk, "redrive"])

    assert "/operate/" not in page_of(viewer, saga) and viewer.post(operate).status_code == 403
    assert f'href="{operate}"' in page_of(operator, saga)
    done = operator.post(operate, follow=True)

    assert b"redrive done" in done.content
    assert SagaInstance.objects.get(pk=saga.pk).redrives == 1


def test_the_index_lists_what_needs_attention_each_linking_to_its_filtered_list(saga_worker):
    inject_fault(four_steps.name, "ship", kind=FaultKind.BUSINESS)
    inject_fault(four_steps.name, "charge", kind=FaultKind.TRANSIENT, times=None, direction=C)
    failed = wait_for_saga(four_steps.start(input={}).id)
    orphan = SagaInstance.objects.create(
        name="retired_saga", version=7, state=SagaState.RUNNING, created_at=failed.created_at, updated_at=failed.created_at,
        stuck_after=failed.created_at,  # no progress since: stuck too
    )
    operator = logged_in()

    index = operator.get(reverse("admin:index")).content.decode()
    panel = index[index.index('id="needs-attention"'):index.index("</table>", index.index('id="needs-attention"'))]
    lines = dict(re.findall(r'<a href="([^"]+)">[^<]+</a></th>\s*<td[^>]*>(\d+)</td>', panel))

    sagas = reverse("admin:sagas_sagainstance_changelist")
    assert lines[f"{sagas}?attention=failed"] == "1"
    assert lines[f"{sagas}?attention=stuck"] == "1"
    assert lines[f"{sagas}?attention=no_definition"] == "1"
    assert f"{reverse('admin:sagas_outboxevent_changelist')}?delivery=dead" in lines
    assert reverse("admin:sagas_parkeddelivery_changelist") in lines
    for key, expected in (("failed", failed), ("stuck", orphan), ("no_definition", orphan)):
        listed = operator.get(f"{sagas}?attention={key}")
        assert [s.pk for s in listed.context["cl"].result_list] == [expected.pk], key
