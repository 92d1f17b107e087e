"""Test settings that log everything a careless deployment would: DEBUG, and every SQL statement
with its parameters (``django.db.backends`` at DEBUG). For the secrets-at-rest test of record."""

from tests.settings import *  # noqa: F403

DEBUG = True
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "DEBUG"},
    "loggers": {
        "django.db.backends": {"level": "DEBUG"},
        "workspaces": {"level": "DEBUG"},
        "provisioning": {"level": "DEBUG"},
    },
}
