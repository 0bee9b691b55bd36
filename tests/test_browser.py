"""The admin in a real browser (Playwright driving Debian's chromium, never a downloaded one):
an operator logs in, opens a compensated order and finds the timeline picture with one bar per
step and compensation that ran, then retries a FAILED saga from its page. Screenshots go to
var/screenshots/ for people to look at. Without chromium the tests skip and say why (.ci/run
installs it: apt-get install chromium)."""

import os
import shutil
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.urls import reverse

from orders.models import Order, OrderStatus
from sagas.models import Direction, Fault, FaultKind, SagaState, StepExecution
from sagas.testing import inject_fault, timeline, wait_for_saga
from tests.orders_helpers import a_product, an_order
from tests.sagaapp.sagas import four_steps

pytestmark = pytest.mark.django_db(transaction=True)

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser") or ""
SCREENSHOTS = Path(settings.VAR_DIR) / "screenshots"
PASSWORD = "a-long-browser-test-password"


@pytest.fixture
def browser_page(monkeypatch):
    if not CHROMIUM:
        message = "no chromium: install Debian's package (apt-get install chromium) or set CHROMIUM_PATH"
        print(f"\n{message}")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread; for this test only (check --deploy
    # refuses the variable, and later tests' subprocesses would inherit it).
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(15_000)
        yield page
        browser.close()


def log_in(page, live_server) -> None:
    get_user_model().objects.create_superuser("operator", "operator@example.com", PASSWORD)
    page.goto(f"{live_server.url}{reverse('admin:login')}")
    page.fill("#id_username", "operator")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_selector("#needs-attention")


def test_an_operator_sees_a_compensated_order_as_one_bar_per_step_that_ran(saga_worker, live_server, browser_page):
    page = browser_page
    a_product()
    order = an_order(payment_method="pm_declined")
    saga = wait_for_saga(order.saga_id)
    assert saga.state == SagaState.COMPENSATED, timeline(saga.id)
    ran = StepExecution.objects.filter(saga=saga, started_at__isnull=False).count()

    log_in(page, live_server)
    page.goto(f"{live_server.url}{reverse('admin:orders_order_change', args=[order.pk])}")

    bars = page.locator("svg.saga-timeline rect.timeline-bar")
    assert bars.count() == ran, "one bar per step and compensation that ran"
    assert page.locator("svg.saga-timeline rect.timeline-bar[data-direction=compensate]").count() >= 1
    assert Order.objects.get(pk=order.pk).status == OrderStatus.CANCELLED
    page.locator("#saga-timeline").screenshot(path=str(SCREENSHOTS / "order-timeline.png"))


def test_an_operator_retries_a_failed_saga_from_its_page(saga_worker, live_server, browser_page):
    page = browser_page
    inject_fault(four_steps.name, "ship", kind=FaultKind.BUSINESS)
    stubborn = inject_fault(four_steps.name, "charge", kind=FaultKind.TRANSIENT, times=None, direction=Direction.COMPENSATE)
    saga = wait_for_saga(four_steps.start(input={"trip": "Lisbon"}).id)
    assert saga.state == SagaState.FAILED, timeline(saga.id)
    Fault.objects.filter(pk=stubborn.pk).delete()  # the cause is fixed

    log_in(page, live_server)
    page.locator("#needs-attention").screenshot(path=str(SCREENSHOTS / "admin-needs-attention.png"))
    page.click("#needs-attention a:has-text('FAILED')")
    page.wait_for_selector("#result_list")
    page.screenshot(path=str(SCREENSHOTS / "saga-list.png"), full_page=True)
    fits = "document.documentElement.scrollWidth <= 1280 && [...document.querySelectorAll('#changelist .results')].every(e => e.scrollWidth <= e.clientWidth)"
    assert page.evaluate(fits), "the saga list fits 1280 px: no sideways scrolling, no column hidden"
    page.click(f"#result_list a[href*='{saga.pk}/change/']")
    page.wait_for_selector("svg.saga-timeline")
    page.screenshot(path=str(SCREENSHOTS / "saga-page-failed.png"), full_page=True)
    page.click("a.saga-operation-retry")
    page.click("input[name=confirm]")

    page.wait_for_selector("ul.messagelist li.success")
    assert "retry done" in page.inner_text("ul.messagelist")
    assert wait_for_saga(saga.id, states=[SagaState.COMPENSATED]).state == SagaState.COMPENSATED
    page.reload()
    page.screenshot(path=str(SCREENSHOTS / "saga-page-retried.png"), full_page=True)
