-- Every table the engine shares gets a metatable whose __newindex raises.
-- expect: survive
local case = {}
local trap = { __newindex = function(t, k) error("__newindex trap for " .. tostring(k)) end }
function case.run(H)
  for _, t in ipairs(H.shared) do setmetatable(t, trap) end
  return H.default()
end
