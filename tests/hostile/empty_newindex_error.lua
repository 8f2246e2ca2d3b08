-- Every table the engine shares is emptied, then given a metatable whose __newindex (and __index)
-- raises: an engine write outside a protected call would end in lua_atpanic (abort).
-- expect: survive
local case = {}
local function raise(t, k) error("trap for " .. tostring(k)) end
local trap = { __index = raise, __newindex = raise }
function case.run(H)
  for _, t in ipairs(H.shared) do
    local k = next(t)
    while k ~= nil do
      rawset(t, k, nil)
      k = next(t)
    end
    setmetatable(t, trap)
  end
  return H.default()
end
