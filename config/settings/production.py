"""Production: secrets, hosts and services must come from the environment; passes `check --deploy`.

Refuses to start (ImproperlyConfigured, naming the variable) without SECRET_KEY, DATABASE_URL and
CELERY_BROKER_URL, and on SQLite or the SQLAlchemy broker unless ALLOW_EMBEDDED=true.
"""

from config.env import env_bool, env_int, env_list, env_required, refuse_embedded
from config.settings.base import *  # noqa: F403
from config.settings.base import CELERY_BROKER_URL, DATABASES

SECRET_KEY = env_required(
    "SECRET_KEY",
    "production settings sign sessions and tokens with it; use a long random string, "
    "e.g. `python -c 'import secrets; print(secrets.token_urlsafe(50))'`",
)
# The embedded SQLite database and broker are the defaults everywhere else; here only on request.
ALLOW_EMBEDDED = env_bool("ALLOW_EMBEDDED", False)
if not ALLOW_EMBEDDED:
    env_required("DATABASE_URL", "production settings need the database, e.g. postgres://user:password@host:5432/name (ALLOW_EMBEDDED=true: SQLite)")
    env_required("CELERY_BROKER_URL", "production settings need the broker, e.g. redis://:password@host:6379/0 (ALLOW_EMBEDDED=true: SQLite)")
    refuse_embedded(database_config=DATABASES["default"], broker=CELERY_BROKER_URL)

DEBUG = False
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
# Demo users with published passwords (seed_demo) are refused here unless forced.
DEMO_SEED_ALLOWED = False

# Only a proxy that sets X-Forwarded-Proto itself (and strips what clients send) may be believed;
# with gunicorn exposed directly, any client could claim https.
if env_bool("TRUST_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
if not SECURE_SSL_REDIRECT:
    # Turned off on purpose (TLS ends at a proxy that redirects itself, or plain HTTP on a private
    # host as in docker-compose.yml): check --deploy's W008 would only repeat that choice.
    SILENCED_SYSTEM_CHECKS = ["security.W008"]
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
SECURE_HSTS_PRELOAD = True
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

# collectstatic runs when the image is built; whitenoise serves the hashed, compressed files.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
