-- Every table the engine shares gets a metatable whose __index loops forever: any read of an
-- absent key, by the engine or by the script, spins.
-- expect: survive
local case = {}
local trap = { __index = function() while true do end end }
function case.run(H)
  for _, t in ipairs(H.shared) do setmetatable(t, trap) end
  return H.default()
end
