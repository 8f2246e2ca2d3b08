-- The kept state and the tables in it carry metamethods that loop forever: copying it (reload
-- hand-over) or writing the engine's own keys into it (__decision_timestamp) must stay raw.
-- expect: survive
local case = {}
local function spin() while true do end end
local trap = { __index = spin, __newindex = spin, __len = spin, __eq = spin, __lt = spin,
               __le = spin, __tostring = spin, __concat = spin, __call = spin }
local state = setmetatable({ inner = setmetatable({ 1, 2, 3 }, trap) }, trap)
function case.run(H)
  return H.keep(state)
end
