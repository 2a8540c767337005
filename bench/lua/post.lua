-- POST the same JSON body (args[1]) on every connection as fast as the server answers.
-- Keeps the id of every 202 (for the durability check) and a count per status.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   wrk.method = "POST"
   wrk.body = args[1]
   wrk.headers["Content-Type"] = "application/json"
   req = wrk.format()
   ids = {}
   statuses = {}
end

function request()
   return req
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
   if status == 202 then
      local id = body:match('"id"%s*:%s*"([^"]+)"')
      if id then
         ids[#ids + 1] = id
      end
   end
end

local report = dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")

function done(summary, latency, requests)
   report(threads, summary, latency)
end
