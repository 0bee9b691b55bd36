"""chainsaga's saga engine. Import definitions from here:

    from sagas import Saga, Step, Retry, StepContext, Outcome, Failure, BusinessError, TransientError
"""

from sagas.definition import Failure, Outcome, Retry, Saga, Step, StepContext
from sagas.exceptions import BusinessError, TransientError

__all__ = ["BusinessError", "Failure", "Outcome", "Retry", "Saga", "Step", "StepContext", "TransientError"]
