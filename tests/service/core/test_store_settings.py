"""The store's settings: which URLs name a store, the password kept secret, the snapshot
only for the memory store; and a Redis that asks for a password, given it from the URL or
from `store_password`, against a redis-server of the test's own (never the machine's)."""

from __future__ import annotations

import asyncio

import pytest
from carousel.service.errors import StoreUnavailable
from carousel.service.redisstore import RedisStore
from carousel.service.settings import Settings
from carousel.service.store import MemoryStore, open_store
from pydantic import ValidationError
from storekit import RedisServer


@pytest.mark.parametrize("url", ["memory://", "redis://127.0.0.1:6379/0",
                                 "redis://:secret@redis.internal:6380/13",
                                 "rediss://user:pw@cache.example:6379/2"])
def test_store_urls_that_name_a_store(url):
    assert Settings(store_url=url).store_url == url


@pytest.mark.parametrize("url", ["redis://localhost", "redis://localhost:6379",
                                 "redis://localhost:6379/x", "redis://:6379/0",
                                 "postgres://localhost/0", "redis://localhost:99999/0", ""])
def test_store_urls_that_do_not(url):
    with pytest.raises(ValidationError):
        Settings(store_url=url)


def test_the_password_never_shows_and_a_snapshot_needs_the_memory_store(tmp_path):
    s = Settings(store_url="redis://127.0.0.1:6379/0", store_password="hunter2")
    assert "hunter2" not in repr(s) and s.store_password.get_secret_value() == "hunter2"
    assert Settings(snapshot_path=tmp_path / "s.snap").snapshot_path == tmp_path / "s.snap"
    with pytest.raises(ValidationError, match="snapshot_path is for the memory store"):
        Settings(store_url="redis://127.0.0.1:6379/0", snapshot_path=tmp_path / "s.snap")
    assert isinstance(open_store(Settings(), {}), MemoryStore)


def test_a_redis_with_a_password(tmp_path):
    server = RedisServer(tmp_path)
    server.start("--requirepass", "s3cret", password="s3cret")

    async def main():
        for url, password, works in [(server.url, None, False),
                                     (server.url, "s3cret", True),
                                     (f"redis://:s3cret@127.0.0.1:{server.port}/0", None, True)]:
            settings = Settings(store_url=url, store_password=password)
            store = open_store(settings, {})
            assert isinstance(store, RedisStore)
            try:
                assert await store.ping() is works, (url, password)
                if not works:
                    with pytest.raises(StoreUnavailable):
                        await store.count()
                else:
                    assert await store.count() == 0
            finally:
                await store.close()

    try:
        asyncio.run(main())
    finally:
        server.kill()
