"""Developer laptop: `make run`. Embedded SQLite + SQLAlchemy broker unless env vars say otherwise."""

from config.env import env_bool, env_str
from config.settings.base import *  # noqa: F403

# A published key: fine for a laptop, and production.py never falls back to it.
SECRET_KEY = env_str("SECRET_KEY", "insecure-local-development-key-change-me-0123456789")
DEBUG = env_bool("DEBUG", True)
SAGAS_FAULT_INJECTION = env_bool("SAGAS_FAULT_INJECTION", True)
