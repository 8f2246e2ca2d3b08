-- Every table the engine shares gets a metatable whose __tostring and __concat loop forever: an
-- engine message built from one of them (tostring, luaL_tolstring) spins.
-- expect: survive
local case = {}
local function spin() while true do end end
local trap = { __tostring = spin, __concat = spin }
function case.run(H)
  for _, t in ipairs(H.shared) do setmetatable(t, trap) end
  return H.default()
end
