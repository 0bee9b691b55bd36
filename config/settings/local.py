"""Developer laptop: `make run`. Embedded SQLite + SQLAlchemy broker unless env vars say otherwise."""

from config.env import env_bool
from config.settings.base import *  # noqa: F403

DEBUG = env_bool("DEBUG", True)
SAGAS_FAULT_INJECTION = env_bool("SAGAS_FAULT_INJECTION", True)
