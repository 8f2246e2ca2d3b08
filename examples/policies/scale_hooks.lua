-- scale_hooks.lua: external-scaling hooks for an application with external_scaler_enabled.
--
-- judge: every POST .../scale request passes through it. Requests above max_replicas are
-- clamped to it; a request to scale a deployment to 0 during business hours is refused (the
-- caller gets 422 with the reason), since cold starts then would hit real users.
--
-- tick: follows a schedule. Each schedule entry is a window of hours with the replica counts to
-- set when the window opens (off_hours applies outside every window). Targets are set only when
-- the window changes, so scale requests made inside a window stand until the next boundary. The
-- current window is kept in ctx.state across ticks (and across a reload).
--
-- Hours are the controller's local time, or UTC with utc = true. A window may wrap midnight
-- (start_hour 22, end_hour 6).
--
-- Config (applications[]):
--   external_scaler_enabled: true
--   external_scaler:
--     hook: scale_hooks.lua:judge
--     tick: scale_hooks.lua:tick
--     tick_interval_s: 60
--     kwargs:
--       max_replicas: 8
--       start_hour: 9            # business hours, for judge
--       end_hour: 17
--       schedule:
--         - {start_hour: 8, end_hour: 18, replicas: {Model: 4}}
--       off_hours: {Model: 1}

local M = {}

local defaults = { start_hour = 9, end_hour = 17, max_replicas = 10, utc = false }

local function option(kwargs, name)
    if kwargs and kwargs[name] ~= nil then
        return kwargs[name]
    end
    return defaults[name]
end

local function hour_of(t, kwargs)
    return os.date(option(kwargs, "utc") and "!*t" or "*t", t).hour
end

local function in_window(hour, first, last)
    if first <= last then
        return hour >= first and hour < last
    end
    return hour >= first or hour < last -- wraps midnight
end

function M.judge(req, kwargs)
    local n = req.target_num_replicas
    local first, last = option(kwargs, "start_hour"), option(kwargs, "end_hour")
    if n == 0 and in_window(hour_of(req.time, kwargs), first, last) then
        return "refuse",
            string.format("%s cannot scale to 0 during business hours (%02d:00-%02d:00)",
                req.deployment, first, last)
    end
    local max = option(kwargs, "max_replicas")
    if n > max then
        return "clamp", max, string.format("at most %d replicas per deployment", max)
    end
    return "accept"
end

function M.tick(ctx, kwargs)
    local schedule = kwargs and kwargs.schedule or {}
    local hour = hour_of(ctx.time, kwargs)
    local window = 0 -- 0: outside every window
    for i, entry in ipairs(schedule) do
        if in_window(hour, entry.start_hour, entry.end_hour) then
            window = i
            break
        end
    end
    if ctx.state.window == window then
        return nil -- not a boundary: leave targets (and earlier scale requests) alone
    end
    ctx.state.window = window
    local wanted = window > 0 and schedule[window].replicas or (kwargs and kwargs.off_hours)
    if not wanted then
        return nil
    end
    local max = option(kwargs, "max_replicas")
    local targets = {}
    for name, n in pairs(wanted) do
        if ctx.deployments[name] then -- a name of another application is not ours to set
            targets[name] = math.min(n, max)
        end
    end
    return targets
end

-- Runs at load and at every reload: a broken edit is refused and the old version stays.
function M.self_test()
    local kw = { utc = true, max_replicas = 5, start_hour = 9, end_hour = 17 }
    local noon, night = 12 * 3600, 22 * 3600 -- on the epoch day, UTC
    local req = { deployment = "Model", target_num_replicas = 0, time = noon }
    assert(M.judge(req, kw) == "refuse", "no scale to 0 at noon")
    req.time = night
    assert(M.judge(req, kw) == "accept", "scale to 0 at night is fine")
    req.target_num_replicas = 9
    local verdict, n = M.judge(req, kw)
    assert(verdict == "clamp" and n == 5, "clamped to max_replicas")

    kw.schedule = { { start_hour = 8, end_hour = 18, replicas = { Model = 4 } } }
    kw.off_hours = { Model = 1 }
    local ctx = { time = noon, state = {}, deployments = { Model = {} } }
    assert(M.tick(ctx, kw).Model == 4, "the day window opens")
    assert(M.tick(ctx, kw) == nil, "no change inside the window")
    ctx.time = night
    assert(M.tick(ctx, kw).Model == 1, "off hours")
end

return M
