-- The metatables the engine put on its tables are taken away (setmetatable(t, nil)): lazy fields
-- (request.id/headers/body, ctx.raw_metrics) and the router instance's class lookup go with them.
-- expect: survive
local case = {}
function case.run(H)
  for _, t in ipairs(H.shared) do
    if getmetatable(t) ~= nil then setmetatable(t, nil) end
  end
  return H.default()
end
