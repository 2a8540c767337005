-- Writes wrk's summary as JSON to $BENCH_OUT and the collected ids to $BENCH_IDS_OUT.

return function(threads, summary, latency)
   local statuses = {}
   local ids = io.open(os.getenv("BENCH_IDS_OUT"), "w")
   for _, thread in ipairs(threads) do
      for status, n in pairs(thread:get("statuses") or {}) do
         statuses[status] = (statuses[status] or 0) + n
      end
      for _, id in ipairs(thread:get("ids") or {}) do
         ids:write(id, "\n")
      end
   end
   ids:close()
   local parts = {}
   for status, n in pairs(statuses) do
      parts[#parts + 1] = string.format('"%d": %d', status, n)
   end
   local e = summary.errors
   local out = io.open(os.getenv("BENCH_OUT"), "w")
   out:write(string.format(
      '{"requests": %d, "duration_us": %d, "statuses": {%s}, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
      '"latency_us": {"p50": %f, "p90": %f, "p99": %f, "p999": %f, "max": %f, "mean": %f}}',
      summary.requests, summary.duration, table.concat(parts, ", "),
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), latency.max, latency.mean))
   out:close()
end
