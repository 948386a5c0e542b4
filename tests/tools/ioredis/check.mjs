// ioredis against kvstore's RESP port. ioredis checks INFO's `loading`
// field before it sends anything, pipelines by default and reads SCAN
// cursors as strings. Exits non-zero, with the failed assertion, on any
// difference from Redis's behaviour.
import assert from "node:assert/strict";
import Redis from "ioredis";

const port = Number(process.argv[2]);
const redis = new Redis({ port, lazyConnect: true, maxRetriesPerRequest: 0, connectTimeout: 5000 });
await redis.connect();

assert.equal(await redis.ping(), "PONG");
assert.equal(await redis.set("io", "v", "EX", 100), "OK");
assert.equal(await redis.get("io"), "v");
const ttl = await redis.ttl("io");
assert.ok(ttl >= 99 && ttl <= 100, `ttl ${ttl}`);
assert.equal(await redis.set("io", "w", "NX"), null);
assert.equal(await redis.incrby("io:n", 5), 5);
assert.equal(await redis.incrbyfloat("io:f", "2.5"), "2.5");

// Commands sent together, without waiting, answered in order.
const [a, b, c] = await Promise.all([redis.set("io:a", "1"), redis.incr("io:a"), redis.get("io:a")]);
assert.deepEqual([a, b, c], ["OK", 2, "2"]);
assert.deepEqual(
  await redis.pipeline().set("io:p", "x").append("io:p", "y").strlen("io:p").exec(),
  [[null, "OK"], [null, 2], [null, 2]],
);

// A transaction: one batch, replies in EXEC's array.
assert.deepEqual(
  await redis.multi().set("io:t", "1").incr("io:t").get("io:t").exec(),
  [[null, "OK"], [null, 2], [null, "2"]],
);

assert.equal(await redis.mset({ "io:m1": "1", "io:m2": "2" }), "OK");
assert.deepEqual(await redis.mget("io:m1", "io:m2", "io:m3"), ["1", "2", null]);
assert.equal(await redis.expire("io:m1", 50), 1);
assert.equal(await redis.persist("io:m1"), 1);
assert.equal(await redis.ttl("io:m1"), -1);

// SCAN by stream: every key of the pattern once, over several calls.
const seen = [];
await new Promise((resolve, reject) => {
  redis
    .scanStream({ match: "io:m*", count: 1 })
    .on("data", (keys) => seen.push(...keys))
    .on("end", resolve)
    .on("error", reject);
});
assert.deepEqual(seen.sort(), ["io:m1", "io:m2"]);

assert.equal(await redis.del("io", "io:missing"), 1);
assert.equal(await redis.get("io"), null);
assert.equal(await redis.type("io:a"), "string");
await assert.rejects(redis.call("NOSUCH", "x"), /unknown command 'NOSUCH'/);
const info = await redis.info("server");
assert.match(info, /redis_version:7\.2\.0/);

redis.disconnect();
console.log("ioredis ok");
