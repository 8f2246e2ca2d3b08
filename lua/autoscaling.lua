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
-- With no replica running there is nothing to measure: the target in force stays, as in Ray's
-- core policy, so replicas still starting are not scaled away (requests waiting at zero are the
-- engine's cold start, decided before any policy is asked).
-- Returning nil as the state keeps ctx.policy_state as it is.
function M.default_autoscaling_policy(ctx)
    if ctx.current_num_replicas == 0 then
        return ctx.target_num_replicas, nil
    end
    return ctx.total_num_requests / ctx.config.target_ongoing_requests, nil
end

M.replica_queue_length_autoscaling_policy = M.default_autoscaling_policy

-- Run at load and at every reload: a broken edit never replaces a working policy.
function M.self_test()
    local ctx = { current_num_replicas = 1, target_num_replicas = 1, total_num_requests = 10,
                  config = { target_ongoing_requests = 2 } }
    assert(M.default_autoscaling_policy(ctx) == 5, "10 requests at 2 per replica want 5 replicas")
    ctx.total_num_requests = 0
    assert(M.default_autoscaling_policy(ctx) == 0, "no requests want no replicas")
    ctx.current_num_replicas, ctx.target_num_replicas = 0, 3
    assert(M.default_autoscaling_policy(ctx) == 3, "no replica running keeps the target")
end

return M
