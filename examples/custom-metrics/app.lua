-- custom-metrics: replicas report a cpu-like load figure through record_autoscaling_stats, and
-- the policy (../policies/custom_metrics.lua) scales to keep its mean near the target.
local serve = require "moonserve"

local Worker = serve.deployment { name = "Worker", max_ongoing_requests = 8 }

function Worker:init()
    self.busy = 0
end

function Worker:__call(req)
    local ms = tonumber(req.query.work_ms or "20")
    self.busy = self.busy + 1
    serve.sleep(ms / 1000)
    self.busy = self.busy - 1
    return { done = ms }
end

-- A stand-in for a real CPU reading: the share of the replica's request slots in use.
function Worker:record_autoscaling_stats()
    return { cpu_usage = 100 * self.busy / 8 }
end

return { app = Worker:bind() }
