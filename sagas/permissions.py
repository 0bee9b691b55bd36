"""Who may operate the engine: one list of permissions, checked alike by the staff API, the admin
and the command line (`manage.py sagas retry|abort|redrive --user NAME`).

Reading needs the model's Django "view" permission; each operator action needs its own permission
(sagas.models Meta.permissions) on top of it, as in the admin, where the action sits on the list
that needs "view". Being staff only lets a user in; superusers hold every permission.
"""

from __future__ import annotations

from rest_framework.permissions import BasePermission

VIEW_SAGA = "sagas.view_sagainstance"
RETRY_SAGA = "sagas.retry_saga"
ABORT_SAGA = "sagas.abort_saga"
REDRIVE_SAGA = "sagas.redrive_saga"
VIEW_OUTBOX_EVENT = "sagas.view_outboxevent"
REPLAY_OUTBOX_EVENT = "sagas.replay_outboxevent"
VIEW_PARKED_DELIVERY = "sagas.view_parkeddelivery"
REPLAY_PARKED_DELIVERY = "sagas.replay_parkeddelivery"


def staff_holds(user, permissions) -> bool:
    """An active staff user holding every one of `permissions` (the rule every entry point applies)."""
    return bool(user and user.is_active and user.is_staff and user.has_perms(permissions))


def staff_with(*permissions: str) -> type[BasePermission]:
    """A DRF permission class: an active staff user holding every one of `permissions`; the 403's
    detail names what is needed."""

    class StaffWith(BasePermission):
        message = f"Staff only, with the permission(s) {', '.join(permissions)}."

        def has_permission(self, request, view) -> bool:
            return staff_holds(request.user, permissions)

    StaffWith.__name__ = StaffWith.__qualname__ = f"StaffWith({', '.join(permissions)})"
    return StaffWith
