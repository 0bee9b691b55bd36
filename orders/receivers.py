"""What orders does when the engine tells it something (connected in OrdersConfig.ready)."""

from django.dispatch import receiver

from orders.services import order_keep_saga_summary
from sagas.retention import saga_pruning


@receiver(saga_pruning, dispatch_uid="orders.keep_saga_summary")
def keep_saga_summary(sender, *, sagas, **kwargs) -> None:
    order_keep_saga_summary(saga_ids=[saga.pk for saga in sagas])
