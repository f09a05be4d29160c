-- GET one fixed path (PATH_QUERY), e.g. a list page
local key = os.getenv("API_KEY")
local path = os.getenv("PATH_QUERY")
request = function()
  return wrk.format("GET", path, { ["X-API-Key"] = key })
end
