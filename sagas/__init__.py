"""chainsaga's saga engine. Import definitions from here:

    from sagas import Saga, Step, Retry, StepContext, BusinessError, TransientError
"""

from sagas.definition import Retry, Saga, Step, StepContext
from sagas.exceptions import BusinessError, TransientError

__all__ = ["BusinessError", "Retry", "Saga", "Step", "StepContext", "TransientError"]
