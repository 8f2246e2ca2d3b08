-- The error message is 8 MiB long (built once, at load): the status document must stay small.
-- expect: fail
local case = {}
local long = string.rep("x", 8 * 1024 * 1024)
function case.run(H)
  error(long)
end
