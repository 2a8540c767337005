-- GET the path args[1] (and nothing else), each connection waiting about args[2] ms
-- (uniformly 0.5x to 1.5x) between requests: a fixed, modest rate of one request.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   req = wrk.format("GET", args[1])
   pause = tonumber(args[2])
   statuses = {}
end

function request()
   return req
end

function delay()
   return math.random(math.floor(pause / 2), math.floor(pause * 3 / 2))
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

local report = dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")

function done(summary, latency, requests)
   report(threads, summary, latency)
end
