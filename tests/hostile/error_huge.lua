-- The error message is 4 MiB long (built once, at load): the status document must stay small.
-- expect: fail
local case = {}
local long = string.rep("x", 4 * 1024 * 1024)
function case.run(H)
  error(long)
end
