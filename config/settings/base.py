"""Settings shared by every environment. Every knob comes from the environment."""

import os
from datetime import timedelta
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from config.env import (
    BASE_DIR,
    VAR_DIR,
    broker_transport_options,
    broker_url,
    control_routes,
    database,
    env_bool,
    env_float,
    env_int,
    env_list,
    env_str,
)

# No default here: local.py and test.py have development keys, production.py requires one.
SECRET_KEY = env_str("SECRET_KEY", "")
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
# seed_demo creates users with published passwords; production.py turns this off.
DEMO_SEED_ALLOWED = True

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "axes",
    "sagas",
    "inventory",
    "payments",
    "orders",
]

MIDDLEWARE = [
    "config.outage.OutageMiddleware",  # outermost: a component that is down answers 503, not 500
    "config.middleware.RejectMalformedHeadersMiddleware",  # before anything reads a header
    "config.db_deadline.QueryDeadlineMiddleware",  # a frozen database cannot hold a request
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as axes asks: turns a locked-out admin login into axes' 429 (config.security).
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

VAR_DIR.mkdir(parents=True, exist_ok=True)
DATABASES = {"default": database(env_str("DATABASE_URL", ""), sqlite_file=VAR_DIR / "chainsaga.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Login lockout and the client's address (config.security) ----------------------------------
# Proxies in front of the app that each append the address they saw to X-Forwarded-For. 0: the
# header is ignored and the peer address (REMOTE_ADDR) is the client. Counted wrong, a client can
# pick its own address (too high) or every client shares the proxy's (too low).
NUM_PROXIES = env_int("NUM_PROXIES", 0)
if NUM_PROXIES < 0:
    raise ImproperlyConfigured(f"NUM_PROXIES={NUM_PROXIES} must be 0 or more")
# django-axes checks every authenticate() call (the admin login form and POST /api/auth/token/)
# and locks out a username, and separately a client address, after LOGIN_FAILURE_LIMIT failures
# until LOGIN_COOLOFF_SECONDS have passed since the latest failure.
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 10)
AXES_COOLOFF_TIME = timedelta(seconds=env_int("LOGIN_COOLOFF_SECONDS", 900))
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_CLIENT_IP_CALLABLE = "config.security.client_address"
AXES_LOCKOUT_CALLABLE = "config.security.lockout_response"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env_str("STATIC_ROOT", str(VAR_DIR / "static"))

REDIS_URL = env_str("REDIS_URL", "")

# --- Celery -----------------------------------------------------------------------------------
CELERY_BROKER_URL = broker_url(env_str("CELERY_BROKER_URL", ""), sqlite_file=VAR_DIR / "broker.sqlite3")
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True  # the saga log is the record; no result backend is needed
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = env_str("CELERY_TASK_DEFAULT_QUEUE", "chainsaga")
# The sweeper and the other beat housekeeping run on their own queue, served by their own worker
# process (Procfile, docker-compose.yml): a step pool that is busy or stuck on locks must not
# delay deadlines and re-drives.
SAGAS_CONTROL_QUEUE = env_str("SAGAS_CONTROL_QUEUE", f"{CELERY_TASK_DEFAULT_QUEUE}-control")
CELERY_TASK_ROUTES = control_routes(SAGAS_CONTROL_QUEUE)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TIMEZONE = "UTC"
CELERY_WORKER_CONSUMER = "sagas.worker:WorkerConsumer"  # survives losing Redis and poison messages
# Celery's Django fixup closes the database connection around every task unless told to reuse
# it: a new PostgreSQL connection per task costs more than most steps. Reused for this many
# tasks; config.celery also drops a connection that broke or outlived CONN_MAX_AGE before a task.
CELERY_DB_REUSE_MAX = env_int("CELERY_DB_REUSE_MAX", 1000)
# Redis (and SQS) redeliver an unacknowledged message after this many seconds. It must exceed
# any step's timeout plus its largest retry delay, or a slow step would be delivered twice while
# still running; sagas.definition refuses a step that breaks this.
SAGAS_VISIBILITY_TIMEOUT = env_int("SAGAS_VISIBILITY_TIMEOUT", 3600)
CELERY_BROKER_TRANSPORT_OPTIONS = broker_transport_options(CELERY_BROKER_URL, visibility_timeout=SAGAS_VISIBILITY_TIMEOUT)
# A broker that is down or frozen must not hold a request: connecting and each Redis command are
# bounded, and a publish is tried twice. A message that could not be sent is left to the sweeper
# (sagas.dispatch), which re-drives its saga once the broker is back.
CELERY_BROKER_CONNECTION_TIMEOUT = env_float("BROKER_CONNECT_TIMEOUT", 1.5)
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}

SAGAS_SWEEP_INTERVAL = env_float("SAGAS_SWEEP_INTERVAL", 10.0)
CELERY_BEAT_SCHEDULE = {
    "sagas-sweep": {
        "task": "sagas.sweep",
        "schedule": timedelta(seconds=SAGAS_SWEEP_INTERVAL),
        "options": {"expires": SAGAS_SWEEP_INTERVAL * 2},
    },
    "outbox-relay": {
        "task": "sagas.relay_outbox",
        "schedule": timedelta(seconds=env_float("OUTBOX_RELAY_INTERVAL", 1.0)),
        "options": {"expires": 10},
    },
    "outbox-cleanup": {"task": "sagas.outbox_cleanup", "schedule": timedelta(hours=1)},
    "consumers-redeliver": {
        "task": "sagas.consumers_redeliver",
        "schedule": timedelta(seconds=env_float("CONSUMER_REDELIVER_INTERVAL", 60.0)),
        "options": {"expires": env_float("CONSUMER_REDELIVER_INTERVAL", 60.0)},
    },
}
# History retention (see "Retention" in the README): each task deletes in batches of
# RETENTION_BATCH_SIZE rows for at most RETENTION_TIME_BUDGET seconds, every RETENTION_INTERVAL.
RETENTION_INTERVAL = env_float("RETENTION_INTERVAL", 600.0)
RETENTION_BATCH_SIZE = env_int("RETENTION_BATCH_SIZE", 500)
RETENTION_TIME_BUDGET = env_float("RETENTION_TIME_BUDGET", 10.0)
CELERY_BEAT_SCHEDULE.update(
    {
        f"prune-{name}": {"task": task, "schedule": timedelta(seconds=RETENTION_INTERVAL), "options": {"expires": RETENTION_INTERVAL}}
        for name, task in (
            ("sagas", "sagas.prune_sagas"),
            ("inbox", "sagas.prune_inbox"),
            ("idempotency-records", "orders.prune_idempotency_records"),
            ("reservations", "inventory.prune_reservations"),
        )
    }
)
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")

# --- Saga engine ------------------------------------------------------------------------------
# Days a settled saga (COMPLETED or COMPENSATED) is kept, with its steps, after it finished; then
# it is pruned (an order keeps a summary). FAILED and running sagas are never pruned. 0: kept forever.
SAGAS_RETENTION_DAYS = env_float("SAGAS_RETENTION_DAYS", 30.0)
# Days a consumer's inbox row (and delivery count) is kept. It must outlast every way an event can
# come again: the outbox retention (a stream repaired from it) and the redelivery window (checked
# at start-up, sagas.checks). 0: kept forever.
SAGAS_INBOX_RETENTION_DAYS = env_float("SAGAS_INBOX_RETENTION_DAYS", 30.0)
# Fault injection lets tests and demos make a named step fail; it costs one query per step.
SAGAS_FAULT_INJECTION = env_bool("SAGAS_FAULT_INJECTION", False)
# How long past a step's timeout the sweeper waits before re-driving a saga that made no progress.
SAGAS_STUCK_GRACE = env_float("SAGAS_STUCK_GRACE", 5.0)
SAGAS_SWEEP_BATCH = env_int("SAGAS_SWEEP_BATCH", 200)
# A step message for a saga whose definition this worker lacks (restart the workers after adding
# or changing a saga) waits this long (s) before it is tried again.
SAGAS_UNKNOWN_DEFINITION_RETRY = env_float("SAGAS_UNKNOWN_DEFINITION_RETRY", 30.0)
# After a message could not be sent, this process leaves the broker alone for this long (s).
SAGAS_BROKER_RETRY_AFTER = env_float("SAGAS_BROKER_RETRY_AFTER", 5.0)
# Each worker writes a heartbeat this often (s); health calls the workers stalled when work
# waits and none of them accepted a task for WORKERS_STALLED_AFTER seconds.
SAGAS_HEARTBEAT_INTERVAL = env_float("SAGAS_HEARTBEAT_INTERVAL", 5.0)
WORKERS_STALLED_AFTER = env_float("WORKERS_STALLED_AFTER", 60.0)
# A step waits at most a third of its timeout for a row lock, and never longer than this (s).
SAGAS_STEP_LOCK_TIMEOUT_MAX = env_float("SAGAS_STEP_LOCK_TIMEOUT_MAX", 10.0)

# --- Metrics ------------------------------------------------------------------------------------
# Prometheus metrics at /metrics (sagas.metrics): readable by staff, or with this bearer token.
SAGAS_METRICS = env_bool("SAGAS_METRICS", True)
METRICS_TOKEN = env_str("METRICS_TOKEN", "")
# Where every process writes its counters (prometheus-client's multiprocess mode); web, workers
# and beat of one host share it, and it is emptied when they all start afresh (make run does).
# Set before anything imports prometheus_client.
PROMETHEUS_MULTIPROC_DIR = os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(VAR_DIR / "metrics"))
Path(PROMETHEUS_MULTIPROC_DIR).mkdir(parents=True, exist_ok=True)

# --- Logging ------------------------------------------------------------------------------------
# LOG_FORMAT=json: one JSON object a line (structlog), with the saga id, name, version, step,
# direction and delivery number on every line logged while a step runs (config.logs).
LOG_FORMAT = env_str("LOG_FORMAT", "plain")
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be plain or json, not {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"()": "config.logs.PlainFormatter", "format": "%(asctime)s %(levelname)s %(name)s %(processName)s %(message)s"},
        "json": {"()": "config.logs.json_formatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["step_context", "quiet_housekeeping"]}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "filters": {
        "quiet_outage": {"()": "config.outage.QuietOutageFilter"},
        "step_context": {"()": "sagas.log.StepContextFilter"},
        "quiet_housekeeping": {"()": "config.logs.QuietHousekeepingFilter"},
    },
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "django.request": {"filters": ["quiet_outage"]},  # an outage is one line (config.outage), not a traceback per request
        "axes": {"level": "WARNING"},  # one INFO line per login attempt; failures and lockouts are WARNINGs
    },
}

# --- Payments -----------------------------------------------------------------------------------
# The simulated provider's ledger (stands in for the provider's servers; kept outside our database).
PAYMENTS_PROVIDER_PATH = env_str("PAYMENTS_PROVIDER_PATH", str(VAR_DIR / "payment-provider.sqlite3"))

# --- Orders -------------------------------------------------------------------------------------
# An orchestrated order still unsettled this many seconds after it was placed (a payment that
# never answers) is undone by the saga deadline, which releases its reserved stock.
ORDER_PAYMENT_DEADLINE = env_float("ORDER_PAYMENT_DEADLINE", 900.0)
# Orders one customer may have pending at once through the API; one more is answered 429.
ORDER_MAX_PENDING_PER_CUSTOMER = env_int("ORDER_MAX_PENDING_PER_CUSTOMER", 20)
# Days an Idempotency-Key of POST /api/orders/ is remembered; after that the same key places a new
# order. 0: kept forever.
ORDER_IDEMPOTENCY_RETENTION_DAYS = env_float("ORDER_IDEMPOTENCY_RETENTION_DAYS", 30.0)
# Days a settled stock reservation (released, or committed when its order shipped) is kept after it
# settled. Held ones are never pruned. 0: kept forever.
INVENTORY_RESERVATION_RETENTION_DAYS = env_float("INVENTORY_RESERVATION_RETENTION_DAYS", 30.0)

# --- REST API -----------------------------------------------------------------------------------
REST_FRAMEWORK = {
    # Token first: its WWW-Authenticate header makes an unauthenticated request a 401, not a 403.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["config.parsers.StrictJSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer", "rest_framework.renderers.BrowsableAPIRenderer"],
    "DEFAULT_PAGINATION_CLASS": "config.pagination.ValidatedPageNumberPagination",
    "PAGE_SIZE": 50,
    # Anonymous callers are counted per client address (config.security, the NUM_PROXIES rule).
    "DEFAULT_THROTTLE_CLASSES": [
        "config.security.AnonRateThrottle",
        "config.security.UserRateThrottle",
    ],
    "NUM_PROXIES": NUM_PROXIES,
    "DEFAULT_THROTTLE_RATES": {
        "anon": env_str("API_THROTTLE_ANON", "60/min"),
        "user": env_str("API_THROTTLE_USER", "6000/min"),
    },
    "DEFAULT_SCHEMA_CLASS": "config.schema.ApiAutoSchema",
    "EXCEPTION_HANDLER": "config.api.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "chainsaga",
    "DESCRIPTION": "Orders placed through a saga: reserve stock, charge payment, notify fulfillment, or undo.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    # Swagger UI served from this app, not a CDN: works offline and behind strict CSPs.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}
# Bodies larger than this are refused with a JSON 413 (config.api); an order is a few KB.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("API_MAX_BODY_BYTES", 2_621_440)
# Throttle counters live in the cache: Redis when REDIS_URL is set (shared by every web process).
# Bounded: a cache that is down or frozen costs at most these timeouts, and the throttles then
# count per process for CACHE_RETRY_AFTER seconds (config.throttle_cache).
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "OPTIONS": {"socket_connect_timeout": 1.0, "socket_timeout": 1.0},
    }
    if REDIS_URL
    else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
}
CACHE_RETRY_AFTER = env_float("CACHE_RETRY_AFTER", 10.0)

# --- Outages (config.outage, config.db_deadline) --------------------------------------------------
# Every query of a web request must finish within this many seconds of the request's start (0: no
# deadline); past it the query's connection is cut and the client gets a 503.
WEB_DB_DEADLINE = env_float("WEB_DB_DEADLINE", 4.0)
OUTAGE_RETRY_AFTER = env_int("OUTAGE_RETRY_AFTER", 5)  # the 503's Retry-After (s)
# /api/health/ answers within this many seconds whatever hangs; HEALTH_TOKEN (Authorization:
# Bearer ...) shows a monitoring system the details staff see.
HEALTH_CHECK_TIMEOUT = env_float("HEALTH_CHECK_TIMEOUT", 2.5)
HEALTH_TOKEN = env_str("HEALTH_TOKEN", "")
HEALTH_THROTTLE_RATE = env_str("API_THROTTLE_HEALTH", "120/min")  # per client address

# --- Transactional outbox ------------------------------------------------------------------------
# Comma-separated: "redis" (Redis Streams events.<aggregate_type>, needs REDIS_URL), "consumers"
# (in-process consumers as Celery tasks, which the choreographed flow needs), or dotted paths.
OUTBOX_PUBLISHER = env_str("OUTBOX_PUBLISHER", "redis,consumers" if REDIS_URL else "consumers")
OUTBOX_RELAY_INTERVAL = env_float("OUTBOX_RELAY_INTERVAL", 1.0)
# Kick the relay right after each commit that emitted events (publish latency: milliseconds);
# off, events wait for the beat's next relay round (up to OUTBOX_RELAY_INTERVAL).
OUTBOX_RELAY_KICK = env_bool("OUTBOX_RELAY_KICK", True)
OUTBOX_BATCH_SIZE = env_int("OUTBOX_BATCH_SIZE", 500)
OUTBOX_RELAY_TIME_BUDGET = env_float("OUTBOX_RELAY_TIME_BUDGET", 5.0)
OUTBOX_MAX_ATTEMPTS = env_int("OUTBOX_MAX_ATTEMPTS", 10)
OUTBOX_RETRY_BACKOFF = env_float("OUTBOX_RETRY_BACKOFF", 1.0)
OUTBOX_RETRY_MAX_DELAY = env_float("OUTBOX_RETRY_MAX_DELAY", 300.0)
OUTBOX_RETENTION_HOURS = env_int("OUTBOX_RETENTION_HOURS", 168)
OUTBOX_STREAM_MAXLEN = env_int("OUTBOX_STREAM_MAXLEN", 1_000_000)
# How often (s, per relay process) the relay checks, even with nothing to publish, that each Redis
# stream still holds the last entry it wrote; a stream that lost entries gets them back (sagas.streams).
OUTBOX_STREAM_CHECK_INTERVAL = env_float("OUTBOX_STREAM_CHECK_INTERVAL", 5.0)
# Events a consumer has not handled this many seconds after publication are delivered again
# (lost messages, exhausted retries), for as long as the window lasts.
CONSUMER_REDELIVER_AFTER = env_int("CONSUMER_REDELIVER_AFTER", 60)
CONSUMER_REDELIVER_WINDOW_HOURS = env_int("CONSUMER_REDELIVER_WINDOW_HOURS", 24)
# A consumer task delivered this many times without finishing (its handler kills the worker) is given up.
CONSUMER_MAX_DELIVERIES = env_int("CONSUMER_MAX_DELIVERIES", 20)
# A handler that raises is retried this many times, after 1, 2, 4, ... s (at most the max delay),
# then the consumer gives up on the event: parked once and settled (sagas.consumers).
CONSUMER_MAX_RETRIES = env_int("CONSUMER_MAX_RETRIES", 8)
CONSUMER_RETRY_MAX_DELAY = env_float("CONSUMER_RETRY_MAX_DELAY", 60.0)
