-- Every table the engine shares gets the same metatable whose __eq, __lt and __le loop forever:
-- comparing two of them (say, an answered candidate with a live one) spins unless it is raw.
-- expect: survive
local case = {}
local function spin() while true do end end
local trap = { __eq = spin, __lt = spin, __le = spin }
function case.run(H)
  for _, t in ipairs(H.shared) do setmetatable(t, trap) end
  return H.default()
end
