"""redis-py against kvstore's RESP port, over RESP2 and RESP3 (redis-py
sends HELLO 3 for protocol=3 and has no fallback). Exits non-zero, with
the failed assertion, on any difference from Redis's behaviour."""

import sys

import redis

port = int(sys.argv[1])
for protocol in (2, 3):
    r = redis.Redis(port=port, protocol=protocol, decode_responses=True)
    assert r.ping() is True
    key = f"py{protocol}"
    assert r.set(key, "v", ex=100) is True
    assert r.get(key) == "v"
    assert 99 <= r.ttl(key) <= 100, r.ttl(key)
    assert r.set(key, "w", nx=True) is None
    assert r.incr(f"{key}:n", 5) == 5
    assert r.incrbyfloat(f"{key}:f", 2.5) == 2.5
    pipe = r.pipeline(transaction=False)
    pipe.set(f"{key}:a", "1")
    pipe.incr(f"{key}:a")
    pipe.get(f"{key}:a")
    assert pipe.execute() == [True, 2, "2"]
    assert r.mset({f"{key}:m1": "1", f"{key}:m2": "2"}) is True
    assert r.mget(f"{key}:m1", f"{key}:m2", f"{key}:m3") == ["1", "2", None]
    assert r.expire(f"{key}:m1", 50) is True
    assert r.persist(f"{key}:m1") is True
    assert r.ttl(f"{key}:m1") == -1
    assert r.delete(key, f"{key}:missing") == 1
    assert r.get(key) is None
    assert r.exists(f"{key}:a") == 1
    assert r.type(f"{key}:a") == "string"
    try:
        r.execute_command("NOSUCH", "x")
        raise AssertionError("an unknown command answered")
    except redis.ResponseError as error:
        assert "unknown command 'NOSUCH'" in str(error), error
    info = r.info()
    assert info["redis_version"] == "7.2.0", info
    assert info["loading"] == 0, info
    assert r.config_get("appendfsync") == {"appendfsync": "always"}
    assert r.client_setname("checker") is True
    assert r.client_getname() == "checker"
print("redis-py: RESP2 and RESP3 ok")
