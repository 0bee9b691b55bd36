# One image for every process (web, worker, beat, migrate); docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DJANGO_SETTINGS_MODULE=config.settings.production \
    CHAINSAGA_VAR_DIR=/app/var \
    STATIC_ROOT=/app/static

RUN groupadd --system --gid 10001 chainsaga \
 && useradd --system --uid 10001 --gid chainsaga --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin chainsaga

# The project is installed into site-packages and the sources are thrown away, so there is exactly
# one copy of the code to import. Files are named one by one: there is no .dockerignore, and the
# build context holds .venv/ and var/ (SQLite files) that must not reach the image.
WORKDIR /tmp/src
COPY pyproject.toml README.md ./
COPY config ./config
COPY sagas ./sagas
COPY orders ./orders
COPY inventory ./inventory
COPY payments ./payments
RUN pip install . \
 && rm -rf /tmp/src

WORKDIR /app
COPY manage.py ./
# config.settings.base creates VAR_DIR at import time; /app is root's, var/ is the app user's.
# collectstatic opens no database or broker, but production settings refuse to import without
# their secrets and URLs: it gets a throwaway key and the embedded defaults, for this command only.
RUN mkdir -p /app/var \
 && chown chainsaga:chainsaga /app/var \
 && SECRET_KEY="$(python -c 'import secrets; print(secrets.token_urlsafe(50))')" ALLOW_EMBEDDED=true \
    python manage.py collectstatic --noinput

# Numeric, so an orchestrator's runAsNonRoot check can verify it without reading /etc/passwd.
USER 10001:10001

EXPOSE 8000
CMD ["gunicorn", "config.wsgi:application", "--bind", "0.0.0.0:8000", "--access-logfile", "-"]
