-- Every table the engine shares becomes weak (__mode "kv"), then garbage is made so that the
-- collector runs: entries the engine keeps only in those tables (candidates in the list, ctx
-- fields) would vanish under it.
-- expect: survive
local case = {}
local weak = { __mode = "kv" }
function case.run(H)
  for _, t in ipairs(H.shared) do setmetatable(t, weak) end
  local junk
  for i = 1, 2000 do junk = { i, tostring(i) } end
  return H.default()
end
