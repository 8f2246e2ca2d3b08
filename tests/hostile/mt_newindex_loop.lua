-- Every table the engine shares gets a metatable whose __newindex loops forever: the engine's
-- next write of an absent key (a refreshed field, a new candidate) spins.
-- expect: survive
local case = {}
local trap = { __newindex = function() while true do end end }
function case.run(H)
  for _, t in ipairs(H.shared) do setmetatable(t, trap) end
  return H.default()
end
