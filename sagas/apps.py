from django.apps import AppConfig
from django.utils.module_loading import autodiscover_modules


class SagasConfig(AppConfig):
    name = "sagas"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from celery.signals import beat_init, worker_init, worker_ready, worker_shutdown

        from sagas import checks  # noqa: F401 - registers the system check
        from sagas import heartbeat

        # Every app's `sagas.py` registers its definitions, so a web process, a worker and beat
        # all know every saga that may be running.
        autodiscover_modules("sagas")
        autodiscover_modules("consumers")  # event handlers (sagas.consumers.subscribe)
        # Django runs the system checks for `migrate` and `runserver`; Celery does not.
        worker_init.connect(_check_worker, weak=False)
        beat_init.connect(_check_beat, weak=False)
        # Liveness for the health check (sagas.heartbeat), from each worker's main process.
        worker_ready.connect(heartbeat.on_worker_ready, weak=False)
        worker_shutdown.connect(heartbeat.on_worker_shutdown, weak=False)


def _check_worker(**kwargs) -> None:
    from sagas.checks import refuse_to_start_on_errors

    refuse_to_start_on_errors("celery worker")


def _check_beat(**kwargs) -> None:
    from sagas.checks import refuse_to_start_on_errors

    refuse_to_start_on_errors("celery beat")
