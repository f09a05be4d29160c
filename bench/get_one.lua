-- GET /v1/documents/{id} for a random id from ids.txt
local ids = {}
for line in io.lines(os.getenv("IDS_FILE")) do ids[#ids + 1] = line end
local key = os.getenv("API_KEY")
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/v1/documents/" .. ids[math.random(#ids)], { ["X-API-Key"] = key })
end
