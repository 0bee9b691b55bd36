"""Exception families of the saga engine.

Business failures (`BusinessError`) mean "this will never succeed": the step fails at once and
the saga compensates. Transient failures (`TransientError`, and by default any other exception)
are retried per the step's policy. Operator errors (`SagaError`) are raised by the Python API
for requests that do not fit a saga's state.
"""


class BusinessError(Exception):
    """A step cannot succeed for a business reason (declined, out of stock). Never retried.
    Its message is shown to end users (StepExecution.reason): say what happened in their terms,
    never internals such as ids of other systems, hosts or paths."""


class TransientError(Exception):
    """A step may succeed if tried again (timeout, connection reset). Retried with backoff."""


class SagaError(Exception):
    """Base of the errors the saga Python API raises for bad requests."""


class SagaNotFound(SagaError):
    pass


class UnknownSagaDefinition(SagaError):
    """No definition is registered under that name and version."""


class InvalidSagaDefinition(SagaError):
    """A definition breaks a rule (duplicate step, timeout beyond the broker's redelivery, ...)."""


class SagaStateConflict(SagaError):
    """The operation does not apply to the saga in its current state (e.g. abort a COMPLETED saga)."""


class WorkerLostTooOften(BusinessError):
    """A step was delivered more times than its budget without ever finishing (it kills its worker)."""


class StepFailedEarlier(BusinessError):
    """A redelivered message for a step that the saga log already records as FAILED."""


class InvalidStepResult(Exception):
    """A step returned a value the saga log cannot keep (not JSON). A bug in the step, not a
    passing fault: never retried, and not a business refusal a customer should read either."""


class SagaIdempotencyConflict(SagaError):
    """A saga was started again under an idempotency key that an earlier start used with another input."""
