--- Behaviour of the WebSocket transport: request correlation, keepalive and
-- reconnect with an injected client; the native connection against the
-- reference server.

-- luacheck: ignore 212/self

local WebSocketTransport = require("whisker.storage.sync.transports.websocket")
local native = require("whisker.storage.sync.native")
local reference_server = require("support.reference_server")
local json = native.json

--- An injected client: `receive` is non-blocking; `replies` answer each sent
-- message of a type (a function of the decoded message).
local function fake_client(replies)
  local client = { sent = {}, inbox = {}, closed = false }
  function client:connect() end
  function client:send(text)
    local message = json.decode(text, "empty")
    table.insert(self.sent, message)
    local reply = replies and replies[message.type]
    if reply then
      for _, answer in ipairs(reply(message)) do
        local encoded = json.encode(answer)
        table.insert(self.inbox, encoded)
      end
    end
  end
  function client:receive()
    return table.remove(self.inbox, 1)
  end
  function client:close()
    self.closed = true
  end
  function client:count(kind)
    local n = 0
    for _, m in ipairs(self.sent) do
      if m.type == kind then n = n + 1 end
    end
    return n
  end
  return client
end

local function auth_ok()
  return { { type = "auth_ok" } }
end

local function new_transport(client, extra)
  local config = { ws_url = "ws://127.0.0.1:9/ws", api_key = "key", reconnect = false,
    response_timeout = 0.5, websocket_client = client }
  for k, v in pairs(extra or {}) do
    config[k] = v
  end
  return WebSocketTransport.new(config)
end

describe("WebSocket transport with an injected client", function()
  it("ignores answers to other requests and takes its own", function()
    local client = fake_client({
      auth = auth_ok,
      sync_request = function(m)
        return {
          { type = "sync_response", request_id = m.request_id + 100, operations = {}, version = 1 },
          { type = "sync_response", request_id = m.request_id, operations = {}, version = 2 },
        }
      end,
    })
    local t = new_transport(client)
    assert.is_true(t:connect())
    assert.equals(2, t:fetch_operations("d", 0).version)
  end)

  it("returns a server error answer as the message", function()
    local client = fake_client({
      auth = auth_ok,
      push_operations = function(m)
        return { { type = "error", request_id = m.request_id, error = "too many operations" } }
      end,
    })
    local t = new_transport(client)
    t:connect()
    local result, err = t:push_operations("d", {})
    assert.is_nil(result)
    assert.equals("too many operations", err)
  end)

  it("delivers remote changes in poll without a request", function()
    local client = fake_client({ auth = auth_ok })
    local t = new_transport(client)
    t:connect()
    local seen = {}
    t:on("remote_change", function(data) table.insert(seen, data.operation.story_id) end)
    local change = json.encode({ type = "remote_change", operation = { story_id = "s9" } })
    table.insert(client.inbox, change)
    assert.equals(1, t:poll())
    assert.same({ "s9" }, seen)
    assert.equals(0, t:poll())
  end)

  it("times out on a monotonic clock and pings once per interval", function()
    local client = fake_client({ auth = auth_ok })
    local t = new_transport(client, { ping_interval = 0.2, response_timeout = 0.7 })
    t:connect()
    local started = native.websocket.clock()
    local result, err = t:fetch_operations("d", 0)
    local elapsed = native.websocket.clock() - started
    assert.is_nil(result)
    assert.matches("timeout", err)
    assert.is_true(elapsed >= 0.7 and elapsed < 1.5, tostring(elapsed))
    local pings = client:count("ping")
    assert.is_true(pings >= 2 and pings <= 4, tostring(pings))
  end)

  it("returns only the version from get_server_version", function()
    local client = fake_client({
      auth = auth_ok,
      sync_request = function(m)
        return { { type = "sync_response", request_id = m.request_id, operations = {}, version = 41 } }
      end,
    })
    local t = new_transport(client)
    t:connect()
    assert.same({ version = 41 }, t:get_server_version("d"))
  end)

  it("does not block when a connection fails, and retries from step", function()
    local client = fake_client({ auth = auth_ok })
    local fail = true
    function client:connect()
      if fail then error("refused") end
    end
    local t = new_transport(client, { reconnect = true, max_reconnect_delay = 0.05 })
    local attempts = {}
    t:on("reconnecting", function(data) table.insert(attempts, data) end)
    local ok, err = t:connect()
    assert.is_nil(ok)
    assert.matches("^Connection failed: ", err)
    assert.is_false(t.connected)
    assert.equals(1, #attempts)
    fail = false
    native.websocket.sleep(0.06)
    t:step()
    assert.is_true(t:is_connected())
  end)
end)

describe("native WebSocket connection", function()
  it("reports a refused connection", function()
    local t = WebSocketTransport.new({ ws_url = "ws://127.0.0.1:9/ws", api_key = "k", response_timeout = 2 })
    local ok, err = t:connect()
    assert.is_nil(ok)
    assert.equals("Connection failed: connection refused to ws://127.0.0.1:9/ws", err)
  end)

  it("syncs with the reference server and delivers remote changes on step", function()
    local server = assert(reference_server.start())
    local ok, err = pcall(function()
      local url = server.ws_url
      local a = WebSocketTransport.new({ ws_url = url, api_key = server.api_key, device_id = "dev-a" })
      local b = WebSocketTransport.new({ ws_url = url, api_key = server.api_key, device_id = "dev-b" })
      local denied = WebSocketTransport.new({ ws_url = url, api_key = "wrong-key-123456" })
      local _, auth_err = denied:connect()
      assert.equals("Authentication failed: invalid API key", auth_err)
      assert.is_true(a:connect())
      assert.is_true(b:connect())
      local changes = {}
      b:on("remote_change", function(data) table.insert(changes, data.operation.story_id) end)
      local pushed = assert(a:push_operations("dev-a", {
        { id = "op-1", type = "create", story_id = "s1", data = { title = "T" }, timestamp = os.time() },
      }))
      assert.is_true(pushed.success)
      local deadline = native.websocket.clock() + 5
      while #changes == 0 and native.websocket.clock() < deadline do
        b:step(0.1)
      end
      assert.same({ "s1" }, changes)
      local fetched = assert(b:fetch_operations("dev-b", 0))
      assert.equals(1, #fetched.operations)
      assert.same({ version = 1 }, b:get_server_version("dev-b"))
      a:disconnect()
      b:disconnect()
      assert.is_false(b:is_connected())
    end)
    server:stop()
    assert(ok, err)
  end)
end)
