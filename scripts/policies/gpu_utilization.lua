-- gpu_utilization.lua: a deployment-level autoscaling policy driven by the utilization of the
-- GPUs the deployment's running replicas hold (docs/gpu.md).
--
-- The mean utilization of those devices, relative to target_utilization, scales the current
-- replica count: 2 replicas whose GPUs run at 0.9 with a 0.6 target want 3. A device several of
-- the replicas share (fractional num_gpus) counts once; a device without a sample (no NVML, a
-- failed read) is left out. Without any sampled device (no GPUs, fresh replicas), the target
-- stays where it is. A device's utilization is the whole device's, including any other
-- deployment placed on it.
--
-- It reads these ctx fields besides the standard ones:
--   ctx.gpus            = { {index = 0, name = "A100", utilization = 0.4 (0..1, or nil),
--                            memory_used_bytes = N (or nil), memory_total_bytes = N}, ... }
--   ctx.replica_gpu_ids = { [replica_id] = {0, 1}, ... }   (the devices each replica holds)
--
-- Config (deployments[].autoscaling_config.policy):
--   policy_function: gpu_utilization.lua:gpu_utilization_policy
--   policy_kwargs: {target_utilization: 0.6}

local M = {}

-- The mean utilization of the sampled devices the running replicas hold, or nil.
local function mean_utilization(ctx)
    local by_index, seen, sum, n = {}, {}, 0, 0
    for _, gpu in ipairs(ctx.gpus or {}) do
        by_index[gpu.index] = gpu
    end
    for _, replica_id in ipairs(ctx.running_replicas or {}) do
        for _, index in ipairs((ctx.replica_gpu_ids or {})[replica_id] or {}) do
            local gpu = by_index[index]
            if gpu and gpu.utilization and not seen[index] then
                seen[index] = true
                sum, n = sum + gpu.utilization, n + 1
            end
        end
    end
    if n == 0 then
        return nil
    end
    return sum / n
end

function M.gpu_utilization_policy(ctx, kwargs)
    local target = (kwargs and kwargs.target_utilization) or 0.6
    assert(type(target) == "number" and target > 0 and target <= 1,
           "target_utilization must be a number in (0, 1]")
    local mean = mean_utilization(ctx)
    if not mean then
        return ctx.target_num_replicas, nil
    end
    -- The wrapper rounds up: floating-point noise such as 3.0000000000000004 must not cost a
    -- replica, so the answer is rounded to millionths first.
    local want = ctx.current_num_replicas * mean / target
    return math.floor(want * 1e6 + 0.5) / 1e6, nil
end

function M.self_test()
    local ctx = {
        current_num_replicas = 2,
        target_num_replicas = 2,
        running_replicas = { "r1", "r2" },
        gpus = {
            { index = 0, name = "A100", utilization = 0.8 },
            { index = 1, name = "A100", utilization = 1.0 },
            { index = 2, name = "A100", utilization = 0.0 },
        },
        replica_gpu_ids = { r1 = { 0 }, r2 = { 1 }, idle = { 2 } },
    }
    assert(M.gpu_utilization_policy(ctx, { target_utilization = 0.6 }) == 3,
           "2 replicas at 0.9 of 0.6 want 3")
    ctx.replica_gpu_ids = { r1 = { 0 }, r2 = { 0 } }
    assert(M.gpu_utilization_policy(ctx, { target_utilization = 0.4 }) == 4,
           "a shared device counts once")
    ctx.gpus = { { index = 0, name = "A100" } }
    assert(M.gpu_utilization_policy(ctx) == 2, "no sample: keep the target")
end

return M
