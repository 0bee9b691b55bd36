"""The mistake: a step added to v1 in place, without a version bump (never imported by the test
process itself: its registry holds the real v1)."""

from sagas import Saga
from tests.sagaapp.upgrade import NAME, steps

upgrade_v1 = Saga(NAME, version=1, steps=steps("one", "two", "three", "four"))
