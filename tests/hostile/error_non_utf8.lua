-- The error message is not UTF-8 (invalid bytes, an overlong encoding, a lone surrogate, a NUL
-- and control characters): the status document and the log must stay valid.
-- expect: fail
local case = {}
function case.run(H)
  error("bad bytes: \255\254 \192\128 \237\160\128 \0 \27[31m red")
end
