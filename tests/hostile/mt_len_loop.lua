-- Every table the engine shares gets a metatable whose __len loops forever.
-- expect: survive
local case = {}
local trap = { __len = function() while true do end end }
function case.run(H)
  for _, t in ipairs(H.shared) do setmetatable(t, trap) end
  return H.default()
end
