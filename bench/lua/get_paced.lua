-- GET /jobs/{id} over the ids in the file args[1], each connection waiting about args[2] ms
-- (uniformly 0.5x to 1.5x) between requests: a fixed, modest rate of point reads.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   ids = {}
   for line in io.lines(args[1]) do
      ids[#ids + 1] = line
   end
   pause = tonumber(args[2])
   statuses = {}
   n = math.random(#ids)
end

function request()
   n = n % #ids + 1
   return wrk.format("GET", "/jobs/" .. ids[n])
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
