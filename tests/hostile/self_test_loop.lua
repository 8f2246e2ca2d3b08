-- A self_test that loops forever: the load (check, start, reload) must fail with file:line, and
-- a reload must keep the old version.
-- expect: load
local case = {}
function case.self_test()
  while true do end
end
