-- The kept state is nested 100,000 deep: a recursive copy at a reload overflows the C stack.
-- expect: survive
local case = {}
local deep = {}
for _ = 1, 1e5 do deep = { deep } end
function case.run(H)
  return H.keep({ deep = deep })
end
