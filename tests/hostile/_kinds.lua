-- ------------------------------------------------------------------------------------------------
-- tests/hostile/_kinds.lua, appended by tests/integration/test_hostile.py to a case of the hostile
-- corpus (appended, so the case's own lines keep their numbers in error messages).
--
-- A case defines `local case = {}` with `case.run(H)` (optional: the well-behaved answer) and may
-- define `case.self_test()`. This part turns it into the entry point of every kind of policy
-- script, so that one file serves them all:
--   router      Router:choose_replicas(candidates, request)   (config: FILE.lua:Router)
--   policy      policy(ctx, kwargs)       deployment-level autoscaling policy
--   app_policy  app_policy(ctxs, kwargs)  application-level autoscaling policy
--   judge       judge(req, kwargs)        external-scaling hook, once per scale request
--   tick        tick(ctx, kwargs)         external-scaling tick, on a schedule
--
-- H is built afresh for every call, before the case runs, with raw accesses only (so that what a
-- previous call did to the engine's tables cannot trip this part):
--   H.kind       the kind's name
--   H.shared     every table the engine handed this call, arguments first: the router's
--                instance, candidates list, each candidate and its routing_stats and
--                multiplexed_model_ids, the request; ctx, ctx.policy_state, ctx.running_replicas,
--                ctx.config, ctx.aggregated_metrics; ctxs and each ctx in it; the hook's request;
--                the tick's ctx, ctx.state, ctx.deployments and each entry; kwargs
--   H.default()  the well-behaved answer (the benign version of every case returns it)
--   H.answer(v)  a well-formed answer carrying v where the kind reads its value: the router's
--                first rank (its candidates follow as a second rank), the policy's target, each
--                deployment's target (application policy, tick), the judge's verdict
--   H.keep(s)    the well-behaved answer, with s as the state the kind keeps across calls (the
--                router's persisted `self.state`, policy_state, each deployment's state, the
--                tick's state; the judge keeps it in a local)
-- The policies answer BENIGN_TARGET: it tells their decisions from the built-in policy's.
-- ------------------------------------------------------------------------------------------------
local next, type, rawget, rawset = next, type, rawget, rawset

local BENIGN_TARGET = 0.75
local judge_kept -- the judge has no state of its own: H.keep stores it here
local run = case.run or function(H) return H.default() end

local function add(list, seen, t)
  if type(t) == "table" and not seen[t] then
    seen[t] = true
    list[#list + 1] = t
  end
end

local function add_fields(list, seen, t, keys)
  if type(t) ~= "table" then return end
  for i = 1, #keys do add(list, seen, rawget(t, keys[i])) end
end

local function raw_array(t) -- a fresh copy of t's array part
  local out, i = {}, 1
  if type(t) ~= "table" then return out end
  while rawget(t, i) ~= nil do
    out[i] = rawget(t, i)
    i = i + 1
  end
  return out
end

local function raw_keys(t) -- the string keys of t (deployment names)
  local out = {}
  if type(t) ~= "table" then return out end
  local k = next(t)
  while k ~= nil do
    if type(k) == "string" then out[#out + 1] = k end
    k = next(t, k)
  end
  return out
end

local function each_name(names, v)
  local out = {}
  for i = 1, #names do out[names[i]] = v end
  return out
end

local CTX_TABLES = { "policy_state", "running_replicas", "config", "aggregated_metrics" }

local function add_ctx(list, seen, ctx)
  add(list, seen, ctx)
  add_fields(list, seen, ctx, CTX_TABLES)
end

local function new_H(kind)
  local H = { kind = kind, shared = {} }
  return H, H.shared, {}
end

local function router_H(self, candidates, request)
  local H, list, seen = new_H("router")
  add(list, seen, self)
  add(list, seen, candidates)
  local all = raw_array(candidates)
  for i = 1, #all do
    add(list, seen, all[i])
    add_fields(list, seen, all[i], { "routing_stats", "multiplexed_model_ids" })
  end
  add(list, seen, request)
  H.default = function() return { all } end
  H.answer = function(v) return { v, all } end
  H.keep = function(s)
    rawset(self, "state", s)
    return { all }
  end
  return H
end

local function policy_H(ctx, kwargs)
  local H, list, seen = new_H("policy")
  add_ctx(list, seen, ctx)
  add(list, seen, kwargs)
  H.default = function() return BENIGN_TARGET end
  H.answer = function(v) return v end
  H.keep = function(s) return BENIGN_TARGET, s end
  return H
end

local function app_policy_H(ctxs, kwargs)
  local H, list, seen = new_H("app_policy")
  add(list, seen, ctxs)
  local names = raw_keys(ctxs)
  for i = 1, #names do add_ctx(list, seen, rawget(ctxs, names[i])) end
  add(list, seen, kwargs)
  H.default = function() return each_name(names, BENIGN_TARGET) end
  H.answer = function(v) return each_name(names, v) end
  H.keep = function(s) return each_name(names, BENIGN_TARGET), each_name(names, s) end
  return H
end

-- the well-behaved judge clamps every request to one replica: a request for 2 that ends up
-- applied was accepted by the engine in the judge's place
local function judge_H(req, kwargs)
  local H, list, seen = new_H("judge")
  add(list, seen, req)
  add(list, seen, kwargs)
  H.default = function() return "clamp", 1, "benign" end
  H.answer = function(v) return v end
  H.keep = function(s)
    judge_kept = s
    return "clamp", 1, "benign"
  end
  return H
end

local function tick_H(ctx, kwargs)
  local H, list, seen = new_H("tick")
  add(list, seen, ctx)
  add_fields(list, seen, ctx, { "state", "deployments" })
  local deployments = type(ctx) == "table" and rawget(ctx, "deployments")
  local names = raw_keys(deployments)
  for i = 1, #names do add(list, seen, rawget(deployments, names[i])) end
  add(list, seen, kwargs)
  H.default = function() return nil end
  H.answer = function(v) return each_name(names, v) end
  H.keep = function(s) return nil, s end
  return H
end

local Router = { persist = { "state" } }
function Router:choose_replicas(candidates, request)
  return run(router_H(self, candidates, request))
end

local M = { Router = Router }
function M.policy(ctx, kwargs) return run(policy_H(ctx, kwargs)) end
function M.app_policy(ctxs, kwargs) return run(app_policy_H(ctxs, kwargs)) end
function M.judge(req, kwargs) return run(judge_H(req, kwargs)) end
function M.tick(ctx, kwargs) return run(tick_H(ctx, kwargs)) end

if case.self_test then
  M.self_test = case.self_test
  function Router.self_test() return case.self_test() end
end

return M
