-- The answer and every table in it carry metamethods that loop forever. For a router, the ranks
-- hold live candidates (a valid answer, if read raw); elsewhere a table stands where a number or
-- a verdict belongs. Reading the answer must not run any of them.
-- (A router answering this left its requests unanswered forever.)
-- expect: fail policy app_policy judge tick
local case = {}
local function spin() while true do end end
local trap = { __index = spin, __newindex = spin, __len = spin, __eq = spin, __lt = spin,
               __le = spin, __tostring = spin, __concat = spin, __call = spin }
function case.run(H)
  local rank = {}
  if H.kind == "router" then rank = H.default()[1] end
  local answer = H.answer(setmetatable(rank, trap))
  if type(answer) == "table" then setmetatable(answer, trap) end
  return answer
end
