-- wrk script shared by every scenario (used by bench/run.py; see bench/README.md).
--
-- The request comes from the environment, so one script serves GET and POST scenarios alike:
--   BENCH_METHOD   GET or POST
--   BENCH_HEADERS  "Name: value" lines separated by "\n"
--   BENCH_BODY     the request body (wrk adds Content-Length itself)
-- Each wrk thread loads this file into its own Lua state, so every thread reads the same request.

wrk.method = os.getenv("BENCH_METHOD") or "GET"

local body = os.getenv("BENCH_BODY") or ""
if body ~= "" then
  wrk.body = body
end

-- BENCH_RANDOM_TOKENS=N: each request's {token} in the body is one of N seeded tokens at random (bench/scale.py).
local tokens = tonumber(os.getenv("BENCH_RANDOM_TOKENS") or "") or 0
if tokens > 0 then
  function request()
    local token = string.format("scale%038d", math.random(1, tokens))
    return wrk.format(nil, nil, nil, (body:gsub("{token}", token, 1)))
  end
end

for line in (os.getenv("BENCH_HEADERS") or ""):gmatch("[^\n]+") do
  local name, value = line:match("^([^:]+):%s*(.*)$")
  if name then
    wrk.headers[name] = value
  end
end

-- No per-response hook: a Lua `response` function would cost wrk throughput on every response. wrk already
-- counts responses with status >= 400 (its "Non-2xx or 3xx responses" line, summary.errors.status); none of
-- the benchmarked endpoints redirect, so that count is the non-2xx count.
--
-- done() runs once at the end: print one machine-readable line for bench/run.py to parse.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"non2xx":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,' ..
    '"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.status,
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
