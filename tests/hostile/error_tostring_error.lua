-- The script raises an object whose __tostring raises another such object (and so on), or
-- answers a table instead of a string.
-- expect: fail
local case = {}
local mt = {}
mt.__tostring = function(self)
  if self.depth > 3 then return {} end
  error(setmetatable({ depth = self.depth + 1 }, mt))
end
function case.run(H)
  error(setmetatable({ depth = 0 }, mt))
end
