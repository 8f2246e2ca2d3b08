-- The script raises an object with every metamethod looping forever (__index, __concat, __eq,
-- __len, __call, __tostring, ...): nothing the engine does with the error may run them.
-- expect: fail
local case = {}
local function spin() while true do end end
local obj = setmetatable({}, { __index = spin, __newindex = spin, __len = spin, __eq = spin,
                               __lt = spin, __le = spin, __tostring = spin, __concat = spin,
                               __call = spin, __gc = spin })
function case.run(H)
  error(obj)
end
