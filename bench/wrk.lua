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
local random_request = nil
if tokens > 0 then
  random_request = function()
    local token = string.format("scale%038d", math.random(1, tokens))
    return wrk.format(nil, nil, nil, (body:gsub("{token}", token, 1)))
  end
  request = random_request
end

for line in (os.getenv("BENCH_HEADERS") or ""):gmatch("[^\n]+") do
  local name, value = line:match("^([^:]+):%s*(.*)$")
  if name then
    wrk.headers[name] = value
  end
end

-- BENCH_RATE=R and BENCH_THREADS=N: open loop, the half-load latency run (what wrk2 measures, with the wrk Debian packages).
-- Run with as many threads as connections (-tN -cN): a thread's one connection owns its schedule, and a
-- thread's Lua state cannot tell its connections' responses apart. Request k of thread i is due at
-- epoch_i + k * N / R, the threads staggered by 1 / R, so the whole run sends R requests a second evenly
-- spaced whatever the answers do. Each latency runs from the earlier of its due time and its send: a request
-- sent late because the server was still answering the previous one counts that wait (no coordinated
-- omission); one sent early (wrk's timers have millisecond steps) counts from its send.
local rate = tonumber(os.getenv("BENCH_RATE") or "")
if rate then
  local ffi = require("ffi")
  ffi.cdef [[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clock, bench_timespec *now);
  ]]
  local now = ffi.new("bench_timespec")
  local function now_us()
    ffi.C.clock_gettime(1, now) -- CLOCK_MONOTONIC
    return tonumber(now.tv_sec) * 1e6 + tonumber(now.tv_nsec) / 1e3
  end

  local threads = {}
  function setup(thread) -- in the main Lua state, once per thread before it starts
    thread:set("index", #threads)
    threads[#threads + 1] = thread
  end

  local interval = tonumber(os.getenv("BENCH_THREADS")) * 1e6 / rate -- microseconds between a thread's requests
  local epoch, k, sent = nil, 0, 0
  latencies = {} -- per thread, in microseconds; read by done() through thread:get

  local function due()
    return epoch + k * interval
  end

  function delay() -- milliseconds to wait before request k
    local t = now_us()
    epoch = epoch or t + index * 1e6 / rate
    local wait = due() - t
    return wait > 0 and math.floor(wait / 1000) or 0
  end

  function request()
    sent = now_us()
    return random_request and random_request() or wrk.request()
  end

  function response()
    local start = math.min(due(), sent)
    latencies[#latencies + 1] = now_us() - start
    k = k + 1
  end

  function done(summary)
    local all = {}
    for _, thread in ipairs(threads) do
      for _, us in ipairs(thread:get("latencies")) do
        all[#all + 1] = us
      end
    end
    table.sort(all)
    local function pct(p)
      return #all > 0 and all[math.min(#all, math.floor(#all * p / 100) + 1)] or 0
    end
    local e = summary.errors
    io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"non2xx":%d,"errors":%d,' ..
      '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
      #all, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
      pct(50), pct(90), pct(99), all[#all] or 0))
  end
  return
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
