-- A table grown in a loop until memory runs out.
-- expect: fail
local case = {}
function case.run(H)
  local t, i = {}, 0
  while true do
    i = i + 1
    t[i] = { i, i, i, i }
  end
end
