-- coordinated.lua: an application-level policy that scales a two-stage pipeline together
-- (after Ray Serve's coordinated scaling example). The Preprocessor is sized from its queue
-- depth and the Model, which does twice the work per request, always gets twice as many
-- replicas, so neither stage starves the other.
--
-- Config (applications[].autoscaling_policy):
--   policy_function: coordinated.lua:coordinated_scaling_policy
--   policy_kwargs: {requests_per_replica: 10}   # optional, default 10
--
-- The engine still applies each deployment's factors, bounds and delays to these targets.

local M = {}

function M.coordinated_scaling_policy(ctxs, kwargs)
    local per_replica = (kwargs and kwargs.requests_per_replica) or 10
    local pre = ctxs.Preprocessor
    if not pre then
        return {}, nil -- not deployed (yet): every deployment keeps its target
    end
    local preprocessors = math.max(1, math.ceil(pre.total_num_requests / per_replica))
    local targets = { Preprocessor = preprocessors }
    if ctxs.Model then
        targets.Model = 2 * preprocessors
    end
    return targets, nil
end

function M.self_test()
    local targets = M.coordinated_scaling_policy({
        Preprocessor = { total_num_requests = 25 },
        Model = { total_num_requests = 3 },
    })
    assert(targets.Preprocessor == 3 and targets.Model == 6, "25 queued -> 3 and 6 replicas")
end

return M
