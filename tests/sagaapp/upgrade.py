"""A saga in three deploys, for the upgrade test (tests/test_saga_versions.py). Each module below
is what one deploy registers; a worker gets them with `--include`. Their steps go to their own
queue, so only the test's own workers run them."""

from django.conf import settings

from sagas import Step
from tests.sagaapp.sagas import FAST_RETRY, record

NAME = "test_upgrade"
QUEUE = f"{settings.CELERY_TASK_DEFAULT_QUEUE}-upgrade"


def steps(*names: str) -> list[Step]:
    return [Step(name, action=record, compensation=record, retry=FAST_RETRY, queue=QUEUE, timeout=10.0) for name in names]
