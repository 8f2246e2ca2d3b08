-- The script raises a table: error({}).
-- expect: fail
local case = {}
function case.run(H)
  error({})
end
