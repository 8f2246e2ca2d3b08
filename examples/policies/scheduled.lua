-- scheduled.lua: a deployment-level policy that keeps more replicas during business hours.
--
-- From start_hour to end_hour (local time of the controller, or UTC with utc = true) at least
-- business_replicas run; outside those hours at least off_hours_replicas. Load still counts:
-- the answer is never below what the built-in policy would want. The hour comes from
-- ctx.current_time, so decisions are reproducible in tests.
--
-- Config (deployments[].autoscaling_config.policy):
--   policy_function: scheduled.lua:business_hours
--   policy_kwargs: {start_hour: 9, end_hour: 17, business_replicas: 4, off_hours_replicas: 1}

local M = {}

local defaults = { start_hour = 9, end_hour = 17, business_replicas = 4, off_hours_replicas = 1 }

local function option(kwargs, name)
    if kwargs and kwargs[name] ~= nil then
        return kwargs[name]
    end
    return defaults[name]
end

function M.business_hours(ctx, kwargs)
    local hour = os.date(option(kwargs, "utc") and "!*t" or "*t", ctx.current_time).hour
    local open = hour >= option(kwargs, "start_hour") and hour < option(kwargs, "end_hour")
    local floor = open and option(kwargs, "business_replicas") or option(kwargs, "off_hours_replicas")
    local by_load = ctx.total_num_requests / ctx.config.target_ongoing_requests
    return math.max(floor, by_load), nil
end

function M.self_test()
    local ctx = { total_num_requests = 0, config = { target_ongoing_requests = 2 } }
    ctx.current_time = 12 * 3600 -- 12:00 UTC on the epoch day
    assert(M.business_hours(ctx, { utc = true }) == 4, "noon is within business hours")
    ctx.current_time = 20 * 3600
    assert(M.business_hours(ctx, { utc = true }) == 1, "20:00 is off hours")
    ctx.total_num_requests = 20
    assert(M.business_hours(ctx, { utc = true }) == 10, "load beats the schedule")
end

return M
