-- Every table the engine shares is emptied, then given a metatable whose __newindex (and
-- __index) loops forever: the engine's next refresh of a field writes an absent key and spins.
-- (On a router's candidate tables this hung the controller at 97% CPU.)
-- expect: survive
local case = {}
local function spin() while true do end end
local trap = { __index = spin, __newindex = spin }
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
