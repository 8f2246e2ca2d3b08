-- Every field of every table the engine shares is set to "x": the fields the engine later reads
-- or writes (ctx.running_replicas, ctx.policy_state, ctx.config, a candidate's id and ongoing,
-- the candidates list's entries, the request's fields, the tick's deployments, ...).
-- expect: survive
local case = {}
function case.run(H)
  for _, t in ipairs(H.shared) do
    local keys = {}
    for k in pairs(t) do keys[#keys + 1] = k end
    for _, k in ipairs(keys) do t[k] = "x" end
  end
  return H.default()
end
