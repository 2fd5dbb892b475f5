"""Redis URLs in messages and settings: a password never printed, whatever its form,
and an option the client would refuse at its first connection refused at start-up."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError
from redis import Redis
from redis.exceptions import RedisError

from service.settings import Settings
from service.store import ping, redact
from tests.redis_proc import free_port


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:secret@127.0.0.1:1/0", "redis://:***@127.0.0.1:1/0"),
        # an unencoded "/", "#" or "?" in the password: urlparse found none there
        ("redis://:topSEC/RETpw@127.0.0.1:1/0", "redis://:***@127.0.0.1:1/0"),
        ("redis://u:a#b?c@h:1/0", "redis://u:***@h:1/0"),
        ("redis://justone@h/0", "redis://***@h/0"),
        # redis-py reads these query options too (names percent-decoded)
        ("unix:///tmp/r.sock?password=s3cret&db=2", "unix:///tmp/r.sock?password=***&db=2"),
        ("rediss://h:1/0?ssl_keyfile=k.pem&ssl_password=SECRET",
         "rediss://h:1/0?ssl_keyfile=k.pem&ssl_password=***"),
        ("redis://h:6379/0?pass%77ord=SECRET", "redis://h:6379/0?pass%77ord=***"),
        (":p%40ss@127.0.0.1:5,127.0.0.1:6", "redis://:***@127.0.0.1:5,redis://127.0.0.1:6"),
        ("redis://h:1/0?socket_timeout=1", "redis://h:1/0?socket_timeout=1"),
        # an "@" in a query value is no user-info: the host stays, the password goes
        ("redis://h:5/0?client_name=loader@prod&password=SECRET",
         "redis://h:5/0?client_name=loader@prod&password=***"),
        ("redis://h:5/0?password=abc@SECRET", "redis://h:5/0?password=***"),
        ("redis://localhost:6379/0?client_name=svc@prod",
         "redis://localhost:6379/0?client_name=svc@prod"),
        # a comma in a password: one URL as redis-py reads it, not a node list
        ("redis://:SECRET1,SECRET2@h:1/0", "redis://:***@h:1/0"),
        ("redis://a:1,redis://b:2", "redis://a:1,redis://b:2"),
        ("redis://:p@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
    ],
)
def test_redact_hides_every_password_form(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert "secret" not in redact(url).lower() and "RETpw" not in redact(url)


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("redis://127.0.0.1:6379/0?foo=1", "takes no URL option foo"),
        ("redis://127.0.0.1:6379/0?ssl_password=x", "takes no URL option ssl_password"),
        # options that take an object (a class, a callable): never a URL's text
        ("redis://127.0.0.1:6379/0?parser=x", "takes no URL option parser"),
        ("redis://127.0.0.1:6379/0?retry=x", "takes no URL option retry"),
        ("redis://127.0.0.1:6379/0?connection_class=x", "no option connection_class"),
        # a value redis-py cannot read: its own message, naming the option
        ("redis://127.0.0.1:6379/0?socket_timeout=abc", "Invalid value for 'socket_timeout'"),
        # redis-py's own message quoted the password's first part as the port
        ("redis://:topSEC/RETpw@127.0.0.1:6379/0", "percent-encode"),
    ],
)
def test_a_url_the_client_would_refuse_is_a_setting_error(url: str, said: str) -> None:
    """Accepted before, then a TypeError traceback at the first connection (``ctr serve``
    exited 3 after 40 lines), or redis-py's message quoting part of the password."""
    with pytest.raises(ValidationError) as info:
        Settings(redis_url=url)
    text = str(info.value)
    assert said in text and "topSEC" not in text and "RETpw" not in text


def test_options_a_connection_takes_are_fine() -> None:
    for url in (
        "redis://127.0.0.1:6379/0?socket_timeout=1&max_connections=3&timeout=2",
        "rediss://127.0.0.1:6379/0?ssl_cert_reqs=none&ssl_password=x",
        "unix:///tmp/redis.sock?db=1",
    ):
        assert Settings(redis_url=url).redis_url == url


def test_ping_names_a_bad_url_without_its_password() -> None:
    """``ctr load`` and ``ctr demo`` ask the Redis first: an option the client does not
    take was a TypeError traceback; a malformed password was quoted."""
    port = free_port()
    for url, said in (
        (f"redis://127.0.0.1:{port}/0?foo=1", "takes no URL option foo"),
        (f"redis://:topSEC/RETpw@127.0.0.1:{port}/0", "percent-encode"),
    ):
        with pytest.raises(RedisError) as info:
            ping(url, timeout_s=0.5)
        assert said in str(info.value) and "RETpw" not in str(info.value)
        assert "topSEC" not in str(info.value)


def test_ping_says_a_redis_needs_a_password() -> None:
    """It said "does not answer", quoting a HELLO error."""
    from tests.redis_proc import private_redis

    with private_redis() as rp:
        rp.client().config_set("requirepass", "s3cret")
        with pytest.raises(RedisError, match="needs a password"):
            ping(f"redis://127.0.0.1:{rp.port}/0", timeout_s=2)
        with pytest.raises(RedisError, match="needs a password") as info:
            ping(f"redis://:wrong@127.0.0.1:{rp.port}/0", timeout_s=2)
        assert "wrong" not in str(info.value)
        ping(f"redis://:s3cret@127.0.0.1:{rp.port}/0", timeout_s=2)
        # a refusal is told as the service's start-up tells it (one test, refused_as):
        # ping said "does not answer" for a database the server lacks, and "needs a
        # password" for an ACL user that may not PING
        with pytest.raises(RedisError, match="has no such database"):
            ping(f"redis://:s3cret@127.0.0.1:{rp.port}/99", timeout_s=2)
        with Redis(port=rp.port, password="s3cret") as admin:
            admin.acl_setuser("noping", enabled=True, passwords=["+pw"], commands=["+get"])
        with pytest.raises(RedisError, match="or an ACL user that may run the command"):
            ping(f"redis://noping:pw@127.0.0.1:{rp.port}/0", timeout_s=2)


def test_the_demo_says_why_a_redis_refused_it() -> None:
    """A local Redis that answers and refuses (a wrong password): the demo took it for
    one not answering, started a redis-server on its port and said only "did not come
    up" (diff review, session 47). Now ping's message, and nothing is started."""
    from ctr.demo import RedisUnavailable, ensure_redis
    from tests.redis_proc import private_redis

    with private_redis() as rp:
        rp.client().config_set("requirepass", "s3cret")
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="needs a password") as info:
            ensure_redis(f"redis://:wrong@127.0.0.1:{rp.port}/0")
        assert "wrong" not in str(info.value) and time.monotonic() - started < 4
        with pytest.raises(RedisUnavailable, match="is not a usable Redis URL"):
            ensure_redis(f"redis://127.0.0.1:{rp.port}/1O")


def test_the_demo_stops_the_redis_server_it_started_when_that_one_refuses_it() -> None:
    """No Redis on the URL's port: the demo starts one, which then refuses the URL (a
    database it does not have). The refusal is raised, and the redis-server it started
    is stopped, not left holding the port (diff review, session 47)."""
    import socket

    from ctr.demo import RedisUnavailable, ensure_redis
    from tests.redis_proc import free_port

    port = free_port()
    with pytest.raises(RedisUnavailable, match="has no such database"):
        ensure_redis(f"redis://127.0.0.1:{port}/20")
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free again: nothing left listening


def test_protected_mode_is_told_as_such() -> None:
    """Its DENIED text holds "password": ping said "needs a password", where the fix is
    the server's (requirepass, or bind), as the service's start-up says."""
    from redis.exceptions import ResponseError

    from service.store import refusal, refused_as

    denied = ResponseError(
        "DENIED Redis is running in protected mode because protected mode is enabled and "
        "no password is set for the default user."
    )
    assert refused_as(denied) == "protected"
    assert "protected mode" in (refusal(denied) or "")
    assert refused_as(ResponseError("ERR unknown command 'FOO'")) is None
    assert refused_as(ConnectionError("Connection refused")) is None


def test_each_test_worker_flushes_a_database_of_its_own() -> None:
    """scripts/test.sh runs two pytest-xdist workers and every test flushes its
    database: each worker gets one of its own, never 0 (tests assert nothing landed
    there) nor 11/12 (the container-command tests'), and this process uses its own."""
    import os

    from redis import Redis
    from redis.connection import parse_url

    from tests.helpers import BASE_REDIS_URL, REDIS_URL, worker_redis_url
    from tests.test_container_commands import REDIS_URL as CONTAINER_URL
    from tests.test_container_commands import own_database

    url = "redis://:pw@127.0.0.1:6379/13?socket_timeout=2"
    assert worker_redis_url(url, None) == worker_redis_url(url, "gw0") == url
    dbs = [13]
    for i in range(1, 13):
        other = worker_redis_url(url, f"gw{i}")
        assert other.startswith("redis://:pw@127.0.0.1:6379/") and "socket_timeout=2" in other
        dbs.append(int(parse_url(other)["db"]))
    assert len(set(dbs)) == 13 and not {0, 11, 12} & set(dbs), dbs
    with pytest.raises(RuntimeError, match="gw13: no spare Redis database"):
        worker_redis_url(url, "gw13")
    # whatever database CTR_TEST_REDIS_URL names, no worker shares the one the
    # container-command tests empty (computed from that URL, not from a worker's)
    assert CONTAINER_URL == own_database(BASE_REDIS_URL)
    for db in range(16):
        base = f"redis://127.0.0.1:6379/{db}"
        mine = parse_url(own_database(base))["db"]
        workers = [parse_url(worker_redis_url(base, f"gw{i}")).get("db", 0) for i in range(4)]
        assert mine not in workers and len(set(workers)) == 4, (db, mine, workers)
    # a db= option goes with the path: one database named, the worker's
    assert parse_url(worker_redis_url("redis://h:1?db=10", "gw1"))["db"] == 9
    # the second worker of a default run keeps off the benchmark commands' database
    from ctr.cli_args import BENCH_REDIS

    assert parse_url(worker_redis_url(url, "gw1"))["db"] != parse_url(BENCH_REDIS)["db"]
    assert REDIS_URL == worker_redis_url(BASE_REDIS_URL, os.environ.get("PYTEST_XDIST_WORKER"))
    client = Redis.from_url(REDIS_URL)
    assert client.client_info()["db"] == parse_url(REDIS_URL).get("db", 0)
