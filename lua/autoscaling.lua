-- autoscaling.lua: the built-in autoscaling policy, Ray Serve's default
-- (replica_queue_length_autoscaling_policy, newer form).
--
-- Written on exactly the API user policies get (docs/autoscaling.md): the chunk returns a table
-- of functions and the engine calls policy(ctx) every control-loop tick. Like Ray Serve's, the
-- policy answers only the raw desired replica count; the engine then applies the scaling
-- factors, the min/max bounds, the wall-clock delays and the cold start, the same way it does
-- for custom policies.

local M = {}

-- desired = current * error_ratio
--         = current * total_num_requests / (target_ongoing_requests * current)
--         = total_num_requests / target_ongoing_requests
-- Returning nil as the state keeps ctx.policy_state as it is.
function M.default_autoscaling_policy(ctx)
    return ctx.total_num_requests / ctx.config.target_ongoing_requests, nil
end

M.replica_queue_length_autoscaling_policy = M.default_autoscaling_policy

-- Run at load and at every reload: a broken edit never replaces a working policy.
function M.self_test()
    local ctx = { total_num_requests = 10, config = { target_ongoing_requests = 2 } }
    assert(M.default_autoscaling_policy(ctx) == 5, "10 requests at 2 per replica want 5 replicas")
    ctx.total_num_requests = 0
    assert(M.default_autoscaling_policy(ctx) == 0, "no requests want no replicas")
end

return M
