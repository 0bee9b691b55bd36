"""Deploy 1: test_upgrade v1."""

from sagas import Saga
from tests.sagaapp.upgrade import NAME, steps

upgrade_v1 = Saga(NAME, version=1, steps=steps("one", "two", "three"))
