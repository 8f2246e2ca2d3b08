-- custom_metrics.lua: a deployment-level policy driven by a metric the replicas report
-- themselves (record_autoscaling_stats returning e.g. {cpu_usage = 73.5}).
--
-- The replicas' mean cpu_usage over the look-back window, relative to target_usage, scales the
-- current replica count: 2 replicas at 90% with a 60% target want 3. Without any report yet
-- (fresh replicas), the target stays where it is.
--
-- Config (deployments[].autoscaling_config.policy):
--   policy_function: custom_metrics.lua:cpu_policy
--   policy_kwargs: {metric: cpu_usage, target_usage: 60}

local M = {}

function M.cpu_policy(ctx, kwargs)
    local metric = (kwargs and kwargs.metric) or "cpu_usage"
    local target_usage = (kwargs and kwargs.target_usage) or 60
    local per_replica = ctx.aggregated_metrics[metric]
    local sum, n = 0, 0
    for _, value in pairs(per_replica or {}) do
        sum, n = sum + value, n + 1
    end
    if n == 0 then
        return ctx.target_num_replicas, nil
    end
    return ctx.current_num_replicas * (sum / n) / target_usage, nil
end

function M.self_test()
    local ctx = {
        current_num_replicas = 2,
        target_num_replicas = 2,
        aggregated_metrics = { cpu_usage = { r1 = 80, r2 = 100 } },
    }
    assert(M.cpu_policy(ctx, { target_usage = 60 }) == 3, "2 replicas at 90% of 60% want 3")
    ctx.aggregated_metrics = {}
    assert(M.cpu_policy(ctx) == 2, "no reports: keep the target")
end

return M
