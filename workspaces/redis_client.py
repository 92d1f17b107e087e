from __future__ import annotations

import functools

import redis
from django.conf import settings


@functools.cache
def _client(url: str) -> redis.Redis:
    # redis-py's pool notices a fork (pid change) and opens fresh connections in the child.
    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)


def get_redis() -> redis.Redis:
    return _client(settings.REDIS_URL)
