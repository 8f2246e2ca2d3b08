-- The kept state holds a million entries (built once, at load): handing it over at a reload, or
-- copying it each call, must stay within the engine's bounds.
-- expect: survive
local case = {}
local huge = {}
for i = 1, 1e6 do huge[i] = i end
function case.run(H)
  return H.keep({ huge = huge })
end
