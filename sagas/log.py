"""One structured log line per state transition, always carrying the saga id and step."""

import logging

from sagas.models import SagaInstance

log = logging.getLogger("sagas")


def transition(
    saga: SagaInstance,
    old: str,
    new: str,
    *,
    step: str = "-",
    direction: str = "-",
    detail: str = "",
) -> None:
    log.info(
        "saga_transition saga=%s name=%s v=%s step=%s direction=%s from=%s to=%s detail=%r",
        saga.id,
        saga.name,
        saga.version,
        step,
        direction,
        old,
        new,
        detail,
        extra={"saga_id": str(saga.id), "saga_name": saga.name, "step": step, "direction": direction, "state": new},
    )
