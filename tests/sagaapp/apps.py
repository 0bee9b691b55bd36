from django.apps import AppConfig


class SagaAppConfig(AppConfig):
    """A small app the engine's tests run sagas against (installed by the test settings only)."""

    name = "tests.sagaapp"
    label = "sagaapp"
    default_auto_field = "django.db.models.BigAutoField"
