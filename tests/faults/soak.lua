-- Paced load for wrk: alternate /metrics and /v1/backups; each connection waits DELAY_MS between requests.
local paths = {"/metrics", "/v1/backups"}
local n = 0
wrk.headers["Authorization"] = "Bearer " .. os.getenv("SOAK_TOKEN")
local pause = tonumber(os.getenv("SOAK_DELAY_MS"))

request = function()
  n = n + 1
  return wrk.format("GET", paths[n % 2 + 1])
end

delay = function()
  return pause
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %d, "seconds": %.3f, "p50_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3,
    e.connect, e.read, e.write, e.status, e.timeout))
end
