-- POST /v1/documents with a ~1 KB body
local key = os.getenv("API_KEY")
local counter = 0
request = function()
  counter = counter + 1
  local body = '{"title": "bench ' .. counter .. '", "content": "' .. string.rep("x", 800) ..
    '", "tags": ["bench", "t' .. (counter % 50) .. '"], "metadata": {"n": ' .. counter .. '}}'
  return wrk.format("POST", "/v1/documents",
    { ["X-API-Key"] = key, ["Content-Type"] = "application/json" }, body)
end
