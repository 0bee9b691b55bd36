from django.apps import AppConfig
from django.utils.module_loading import autodiscover_modules


class SagasConfig(AppConfig):
    name = "sagas"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Every app's `sagas.py` registers its definitions, so a web process, a worker and beat
        # all know every saga that may be running.
        autodiscover_modules("sagas")
        autodiscover_modules("consumers")  # event handlers (sagas.consumers.subscribe)
