-- POST exactly args[1] small summarize jobs (ids args[2] .. args[2] + args[1] - 1), each with
-- its own 5 records, as fast as the server answers; stops once every one is answered.
-- Connections with nothing left to submit ask GET /healthz until then, so no extra job is made.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   total = tonumber(args[1])
   first = tonumber(args[2])
   -- wrk calls request() once before it connects and never sends what that call returns.
   sent = -1
   answered = 0
   ids = {}
   statuses = {}
   idle = wrk.format("GET", "/healthz")
end

local function records(i)
   local parts = {}
   for k = 0, 4 do
      parts[#parts + 1] = string.format('{"a":%d,"b":%.1f,"c":%d}', i + k, (i + k) * 0.5, k % 3)
   end
   return "[" .. table.concat(parts, ",") .. "]"
end

function request()
   if sent >= total then
      return idle
   end
   local body = '{"task":"summarize","data":' .. records(first + math.max(sent, 0)) .. "}"
   sent = sent + 1
   return wrk.format("POST", "/jobs", {["Content-Type"] = "application/json"}, body)
end

function response(status, headers, body)
   if status == 200 and body:find('"database"') then
      return  -- a /healthz filler
   end
   statuses[status] = (statuses[status] or 0) + 1
   answered = answered + 1
   if status == 202 then
      ids[#ids + 1] = body:match('"id"%s*:%s*"([^"]+)"')
   end
   if answered >= total then
      wrk.thread:stop()
      io.open(os.getenv("BENCH_FINISHED"), "w"):close()  -- wrk would wait out its duration
   end
end

local report = dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")

function done(summary, latency, requests)
   report(threads, summary, latency)
end
