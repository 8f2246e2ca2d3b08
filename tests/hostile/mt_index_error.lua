-- Every table the engine shares gets a metatable whose __index raises: any read of an absent key
-- errors (an error the engine would meet outside a protected call, if it read non-raw).
-- expect: survive
local case = {}
local trap = { __index = function(t, k) error("__index trap for " .. tostring(k)) end }
function case.run(H)
  for _, t in ipairs(H.shared) do setmetatable(t, trap) end
  return H.default()
end
