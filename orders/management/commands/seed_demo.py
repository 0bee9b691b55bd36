"""Demo data: a catalogue with stock, a demo customer and an admin. Safe to run again.

The users' default passwords are published in the README, so production settings refuse to seed
(DEMO_SEED_ALLOWED) unless --force is given."""

import os
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from rest_framework.authtoken.models import Token

from inventory.services import product_create

CATALOGUE = [
    ("KBD-001", "Mechanical keyboard", "89.90"),
    ("MSE-002", "Wireless mouse", "24.50"),
    ("MON-003", "27-inch monitor", "249.00"),
    ("USB-004", "USB-C hub", "39.99"),
    ("CAM-005", "Web camera", "59.00"),
    ("HDS-006", "Headset", "74.25"),
]


class Command(BaseCommand):
    help = "Create demo products with stock, a demo user and an admin user (idempotent); prints credentials."

    def add_arguments(self, parser):
        parser.add_argument("--stock", type=int, default=500, help="units on hand for each new product (default 500)")
        parser.add_argument("--force", action="store_true", help="seed even under production settings")

    def handle(self, *args, stock: int, force: bool, **options):
        if not settings.DEMO_SEED_ALLOWED and not force:
            raise CommandError(
                "refusing to create demo users with published passwords under production settings; "
                "create real users with `createsuperuser`, or pass --force for a throwaway deployment"
            )
        self.seed(stock=stock)

    @transaction.atomic
    def seed(self, *, stock: int) -> None:
        for sku, name, price in CATALOGUE:
            product_create(sku=sku, name=name, price=Decimal(price), on_hand=stock)
        users = [
            ("demo", os.environ.get("DEMO_PASSWORD", "demo-password"), False),
            ("admin", os.environ.get("ADMIN_PASSWORD", "admin-password"), True),
        ]
        self.stdout.write(f"catalogue: {len(CATALOGUE)} products ({', '.join(sku for sku, _, _ in CATALOGUE)})")
        for username, password, staff in users:
            user, created = get_user_model().objects.get_or_create(
                username=username, defaults={"is_staff": staff, "is_superuser": staff}
            )
            if created:
                user.set_password(password)
                user.save()
            token, _ = Token.objects.get_or_create(user=user)
            note = f"password {password}" if created else "existing user, password unchanged"
            self.stdout.write(f"{'admin' if staff else 'customer'}: {username} ({note}), API token {token.key}")
