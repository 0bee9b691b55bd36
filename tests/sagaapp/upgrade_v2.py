"""Deploy 2 adds a step as version 2 (registered beside v1 until v1's sagas drained)."""

from sagas import Saga
from tests.sagaapp.upgrade import NAME, steps

upgrade_v2 = Saga(NAME, version=2, steps=steps("one", "two", "three", "four"))
