"""The chaos soak's mid-run deploy: `place_order` v2 registered beside v1, the upgrade recipe of the
README ("Upgrading a saga") played while sagas are in flight.

v2 has the same steps as v1 with one policy changed (process_payment may try once more), so its
fingerprint differs and a saga that went on under the other version's definition would show. The
soak's workers import this module after the deploy (`celery worker --include perf.chaos_deploy`),
its web tier once redeployed (perf.chaos_wsgi), and the soak itself when it places orders after the
deploy. From then on `orders.sagas.place_order` names v2, as it would after a deploy whose
orders/sagas.py defined v2 and kept v1 registered: new orders start on v2, those in flight finish
on v1.
"""

from dataclasses import replace

import orders.sagas
from sagas import Saga

place_order_v1 = orders.sagas.place_order


def _v2_step(step):
    if step.name == "process_payment":
        return replace(step, retry=replace(step.retry, max_attempts=step.retry.max_attempts + 1))
    return step


place_order_v2 = Saga(
    "place_order",
    version=2,
    steps=[_v2_step(step) for step in place_order_v1.steps],
    compensate_in_parallel=place_order_v1.compensate_in_parallel,
    continue_on_compensation_failure=place_order_v1.continue_on_compensation_failure,
    deadline=place_order_v1.deadline,
    on_finish=place_order_v1.on_finish,
)
orders.sagas.place_order = place_order_v2
