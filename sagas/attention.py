"""What needs an operator: the admin index's "needs attention" panel and the saga list's
"needs attention" filter read the same definitions, each through an index (the FAILED and active
sagas through saga_stuck_idx, the dead letters through the unpublished-events index).

  - FAILED sagas: a compensation ran out of retries; retry it once the cause is fixed;
  - stuck sagas: in flight with no progress within their step timeout (the sweeper re-drives them;
    one that stays here is waiting on something the sweeper cannot fix);
  - sagas without a definition: in flight or FAILED on a version this deployment lacks;
  - dead-lettered outbox events, and events a consumer gave up on (parked).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from django.db.models import Q, QuerySet
from django.urls import reverse
from django.utils import timezone

from sagas.definition import registered
from sagas.models import OutboxEvent, ParkedDelivery, SagaInstance, SagaState
from sagas.selectors import sagas_stuck
from sagas.versions import NEEDS_DEFINITION


def _failed(sagas: QuerySet) -> QuerySet:
    return sagas.filter(state=SagaState.FAILED)


def _stuck(sagas: QuerySet) -> QuerySet:
    return sagas_stuck(now=timezone.now(), sagas=sagas)


def _without_definition(sagas: QuerySet) -> QuerySet:
    known = Q()
    for definition in registered():
        known |= Q(name=definition.name, version=definition.version)
    needing = sagas.filter(state__in=NEEDS_DEFINITION)
    return needing.exclude(known) if known else needing


@dataclass(frozen=True)
class SagaItem:
    label: str
    sagas: Callable[[QuerySet], QuerySet]


SAGA_ITEMS = {
    "failed": SagaItem("FAILED: a compensation needs attention", _failed),
    "stuck": SagaItem("stuck: no progress within the step timeout", _stuck),
    "no_definition": SagaItem("no definition in this deployment", _without_definition),
}


@dataclass(frozen=True)
class Line:
    label: str
    count: int
    url: str


def attention_lines() -> list[Line]:
    """Each item with its count and the admin list it links to, filtered to it."""
    sagas = reverse("admin:sagas_sagainstance_changelist")
    lines = [Line(item.label, item.sagas(SagaInstance.objects.all()).count(), f"{sagas}?attention={key}") for key, item in SAGA_ITEMS.items()]
    dead = OutboxEvent.objects.filter(published_at__isnull=True, dead_lettered_at__isnull=False).count()
    lines.append(Line("outbox events in the dead letter", dead, f"{reverse('admin:sagas_outboxevent_changelist')}?delivery=dead"))
    parked = ParkedDelivery.objects.count()
    lines.append(Line("events a consumer gave up on", parked, reverse("admin:sagas_parkeddelivery_changelist")))
    return lines
