-- The answer and every table in it carry metamethods that raise. For a router, the ranks
-- hold live candidates (a valid answer, if read raw); elsewhere a table stands where a number or
-- a verdict belongs. Reading the answer must not run any of them.
-- expect: fail policy app_policy judge tick
local case = {}
local function raise(t, k) error("trap " .. tostring(k)) end
local trap = { __index = raise, __newindex = raise, __len = raise, __eq = raise, __lt = raise,
               __le = raise, __tostring = raise, __concat = raise, __call = raise }
function case.run(H)
  local rank = {}
  if H.kind == "router" then rank = H.default()[1] end
  local answer = H.answer(setmetatable(rank, trap))
  if type(answer) == "table" then setmetatable(answer, trap) end
  return answer
end
