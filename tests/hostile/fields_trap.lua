-- Every field of every table the engine shares is replaced by a table whose metamethods all loop
-- forever: whatever the engine does with a field it expects to be a number or a string
-- (compare, concatenate, index, measure, print) spins unless it checks the type first.
-- expect: survive
local case = {}
local function spin() while true do end end
local trap = { __index = spin, __newindex = spin, __len = spin, __eq = spin, __lt = spin,
               __le = spin, __tostring = spin, __concat = spin, __call = spin, __unm = spin,
               __add = spin }
function case.run(H)
  for _, t in ipairs(H.shared) do
    local keys = {}
    for k in pairs(t) do keys[#keys + 1] = k end
    for _, k in ipairs(keys) do t[k] = setmetatable({}, trap) end
  end
  return H.default()
end
