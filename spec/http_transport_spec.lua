--- Behaviour of the native HTTP transport: answers checked from whatever
-- `_request` returns, error messages that name the cause, and real requests.

local HTTPTransport = require("whisker.storage.sync.transports.http")

local function transport(extra)
  local config = { base_url = "http://127.0.0.1:9", api_key = "key-123", max_retries = 0, timeout = 2 }
  for k, v in pairs(extra or {}) do
    config[k] = v
  end
  return HTTPTransport.new(config)
end

--- Replaces `_request` on one instance with canned answers, recording calls.
local function answering(t, status, body)
  local calls = {}
  t._request = function(self, method, path, request_body)
    assert.equals(t, self)
    table.insert(calls, { method = method, path = path, body = request_body })
    return { status = status, body = body }
  end
  return calls
end

describe("native HTTP transport", function()
  it("sends the since version as a whole number", function()
    local t = transport()
    local calls = answering(t, 200, '{"operations":[],"version":3}')
    assert.is_table(t:fetch_operations("dev 1", 5.7))
    assert.equals("/operations?device=dev+1&since=5", calls[1].path)
  end)

  it("names the status and the server's error message", function()
    local t = transport()
    answering(t, 401, '{"error":"invalid API key"}')
    local result, err = t:fetch_operations("d", 0)
    assert.is_nil(result)
    assert.equals("server returned HTTP 401: invalid API key", err)
    answering(t, 502, "bad gateway")
    local _, push_err = t:push_operations("d", {})
    assert.equals("server returned HTTP 502: bad gateway", push_err)
  end)

  it("reports malformed and incomplete answers", function()
    local t = transport()
    answering(t, 200, "<html>")
    local _, err = t:fetch_operations("d", 0)
    assert.matches("^invalid JSON from server: ", err)
    answering(t, 200, "")
    local _, empty = t:get_server_version("d")
    assert.equals("Empty response body", empty)
    answering(t, 200, '{"operations":[]}')
    local _, missing = t:fetch_operations("d", 0)
    assert.equals("Invalid response: missing version number", missing)
  end)

  it("encodes an empty operation list as a JSON array", function()
    local t = transport()
    local calls = answering(t, 200, '{"success":true,"conflicts":[],"version":1}')
    t:push_operations("d", {})
    assert.matches('"operations":%[%]', calls[1].body)
  end)

  it("turns JSON null into nil and passes accepted operations through", function()
    local t = transport()
    answering(t, 201, '{"success":true,"conflicts":null,"version":2,"accepted":[{"op_id":"x","version":2}]}')
    local result = t:push_operations("d", { { id = "x" } })
    assert.is_true(result.success)
    assert.same({}, result.conflicts)
    assert.equals("x", result.accepted[1].op_id)
  end)

  it("names a refused connection with its URL", function()
    local t = transport()
    local result, err = t:fetch_operations("d", 0)
    assert.is_nil(result)
    assert.equals("connection refused to http://127.0.0.1:9/operations?device=d&since=0", err)
  end)

  it("counts its retries in the message when it gives up", function()
    local t = transport({ max_retries = 2, retry_delay = 0.01 })
    local _, err = t:get_server_version("d")
    assert.matches("gave up after 3 attempts", err)
  end)

  it("raises for an unreadable CA file", function()
    assert.has_error(function()
      transport({ ca_file = "/nonexistent/ca.pem" })
    end)
  end)

  it("accepts https URLs natively", function()
    local t = transport({ base_url = "https://sync.example.com" })
    assert.is_true(t.is_https)
    assert.is_true(t:get_info().https_available)
    assert.same({ sent = 0, received = 0 }, t:get_traffic())
  end)
end)
