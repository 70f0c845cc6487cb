--- WebSocket transport for the sync engine: requests and real-time remote
-- changes over one WebSocket.
--
-- Without a `websocket_client` in the config, the connection is native: a
-- background task keeps it alive (a ping every `ping_interval` seconds; a
-- connection silent for `ping_interval + response_timeout` is dropped),
-- reconnects with capped backoff when it drops (if `reconnect`) and then
-- fetches everything after the last version it delivered, so no change is
-- missed. Its events (`remote_change`, `disconnected`, `reconnecting`,
-- `connected`, `message_received`) are delivered to the handlers registered
-- with `on` on the Lua thread only: while a request waits, and in `step` /
-- `poll`, which a caller that waits for changes calls regularly.
--
-- An injected `websocket_client` (an object with `connect(url)`, `send(text)`,
-- non-blocking `receive()` and `close()`) is driven from Lua instead, with the
-- same message handling.
-- @module whisker.storage.sync.transports.websocket

-- luacheck: ignore 212/self (methods keep the old signatures)

local native = require("whisker.storage.sync.native")
local json = native.json
local ws_native = native.websocket

local WebSocketTransport = {}
WebSocketTransport.__index = WebSocketTransport

--- Message types on the wire.
WebSocketTransport.MessageType = {
  SYNC_REQUEST = "sync_request",
  SYNC_RESPONSE = "sync_response",
  PUSH_OPERATIONS = "push_operations",
  PUSH_RESPONSE = "push_response",
  REMOTE_CHANGE = "remote_change",
  PING = "ping",
  PONG = "pong",
  AUTH = "auth",
  AUTH_OK = "auth_ok",
  AUTH_FAILED = "auth_failed",
  ERROR = "error",
}

local MessageType = WebSocketTransport.MessageType

--- Polling period of an injected client's `receive`, in seconds.
local POLL_INTERVAL = 0.01

--- Creates a transport. Does not touch the network.
-- @param config table: `ws_url` (required), `api_key` (required),
--   `reconnect` (true unless false), `ping_interval` seconds (30),
--   `response_timeout` seconds (5), `max_reconnect_delay` seconds (30),
--   `websocket_client` (injected client), `device_id` (sent when
--   authenticating and used to resume), `ca_file` (PEM of extra trusted
--   certificates), `resume_from` (version already seen), `compression`
--   (true: the native connection offers gzip frames for large messages)
-- @return WebSocketTransport
function WebSocketTransport.new(config)
  local self = setmetatable({}, WebSocketTransport)
  self.ws_url = config.ws_url or error("ws_url is required", 2)
  self.api_key = config.api_key or error("api_key is required", 2)
  self.reconnect = config.reconnect ~= false
  self.ping_interval = config.ping_interval or 30
  self.response_timeout = config.response_timeout or 5
  self.max_reconnect_delay = config.max_reconnect_delay or 30
  self.websocket_client = config.websocket_client
  self.device_id = config.device_id
  self.ca_file = config.ca_file
  self.resume_from = config.resume_from
  self.compression = config.compression ~= false
  self.ws = nil
  self.connected = false
  self.authenticated = false
  self.reconnect_attempt = 0
  self.last_pong = nil
  self.ping_timer = nil
  self.pending_responses = {}
  self.next_request_id = 1
  self.event_handlers = {}
  return self
end

--- Registers an event handler (several per event, called in order).
-- Events: `connected {ws_url}`, `disconnected {reason}`,
-- `reconnecting {attempt, delay}`, `message_received {type, data}`,
-- `remote_change {operation}`.
-- @param event event name
-- @param handler function(data)
function WebSocketTransport:on(event, handler)
  if not self.event_handlers[event] then
    self.event_handlers[event] = {}
  end
  table.insert(self.event_handlers[event], handler)
end

--- Calls the handlers of an event; a failing handler is reported on stderr.
function WebSocketTransport:_emit(event, data)
  local handlers = self.event_handlers[event]
  if not handlers then
    return
  end
  for _, handler in ipairs(handlers) do
    local ok, err = pcall(handler, data)
    if not ok then
      io.stderr:write(("whisker-sync: error in websocket '%s' handler: %s\n"):format(event, tostring(err)))
    end
  end
end

--- Encodes a table as JSON.
-- @return text, or nil and `"Failed to serialize JSON: …"`
function WebSocketTransport:_serialize(data)
  return json.encode(data, { "operations" })
end

--- Decodes JSON text.
-- @return table, or nil and `"Empty message"` / `"Failed to deserialize JSON: …"`
function WebSocketTransport:_deserialize(json_string)
  return json.decode(json_string, "Empty message")
end

--- Whether the native connection (not an injected client) is in use.
function WebSocketTransport:_is_native()
  return self.ws ~= nil and self.ws ~= self.websocket_client
end

--- Connects and authenticates.
-- @return true; `true, "Already connected"`; or nil and a message
--   (`"Connection failed: …"`, `"Authentication failed: <reason>"`, `"Authentication timeout"`)
function WebSocketTransport:connect()
  if self.connected then
    return true, "Already connected"
  end
  if self.websocket_client then
    return self:_connect_injected()
  end
  return self:_connect_native()
end

function WebSocketTransport:_connect_native()
  if self.ws then
    self.ws:close()
    self.ws = nil
  end
  local link, err = ws_native.connect({
    url = self.ws_url,
    api_key = self.api_key,
    device_id = self.device_id,
    reconnect = self.reconnect,
    ping_interval = self.ping_interval,
    response_timeout = self.response_timeout,
    max_reconnect_delay = self.max_reconnect_delay,
    ca_file = self.ca_file,
    resume_from = self.resume_from,
    compression = self.compression,
  })
  if not link then
    self.reconnect_attempt = self.reconnect_attempt + 1
    return nil, err
  end
  self.ws = link
  self.connected = true
  self.authenticated = true
  self.reconnect_attempt = 0
  self.last_pong = ws_native.clock()
  self:_emit("connected", { ws_url = self.ws_url })
  return true
end

function WebSocketTransport:_connect_injected()
  self.ws = self.websocket_client
  local ok, result, connect_err = pcall(self.ws.connect, self.ws, self.ws_url)
  local failure
  if not ok then
    failure = result
  elseif (result == nil or result == false) and connect_err ~= nil then
    failure = connect_err
  end
  if failure ~= nil then
    self.ws = nil
    self.reconnect_attempt = self.reconnect_attempt + 1
    if self.reconnect then
      self:_schedule_reconnect()
    end
    return nil, "Connection failed: " .. tostring(failure)
  end
  self.connected = true
  self.reconnect_attempt = 0
  self._reconnect_at = nil
  self:_emit("connected", { ws_url = self.ws_url })
  local auth_ok, auth_err = self:_authenticate()
  if not auth_ok then
    self:disconnect()
    return nil, auth_err
  end
  self.last_pong = ws_native.clock()
  self._last_ping = self.last_pong
  return true
end

--- Sends the auth message and waits for `auth_ok` / `auth_failed` (injected client).
function WebSocketTransport:_authenticate()
  local text, err = self:_serialize({ type = MessageType.AUTH, api_key = self.api_key, device_id = self.device_id })
  if not text then
    return nil, err
  end
  local sent, send_err = pcall(self.ws.send, self.ws, text)
  if not sent then
    return nil, "Send failed: " .. tostring(send_err)
  end
  local deadline = ws_native.clock() + self.response_timeout
  repeat
    local message = self:_receive_injected()
    if message then
      local data = self:_deserialize(message)
      if type(data) == "table" then
        if data.type == MessageType.AUTH_OK then
          self.authenticated = true
          return true
        elseif data.type == MessageType.AUTH_FAILED then
          return nil, "Authentication failed: " .. tostring(data.reason or "Unknown")
        end
      end
    else
      ws_native.sleep(POLL_INTERVAL)
    end
  until ws_native.clock() >= deadline
  return nil, "Authentication timeout"
end

--- Plans the next connection attempt of an injected client: emits
-- `reconnecting {attempt, delay}`; `step`/`poll` retries once the delay passed.
function WebSocketTransport:_schedule_reconnect()
  local delay = math.min(2 ^ (self.reconnect_attempt - 1), self.max_reconnect_delay)
  self._reconnect_at = ws_native.clock() + delay
  self:_emit("reconnecting", { attempt = self.reconnect_attempt, delay = delay })
end

--- Closes the connection (and stops reconnecting).
function WebSocketTransport:disconnect()
  if not self.connected and not self.ws then
    return
  end
  if self.ws then
    local ws = self.ws
    pcall(function() ws:close() end)
    self.ws = nil
  end
  self._reconnect_at = nil
  self.connected = false
  self.authenticated = false
  self.last_pong = nil
  self:_emit("disconnected", { reason = "Manual disconnect" })
end

--- Next message of an injected client, or nil.
function WebSocketTransport:_receive_injected()
  local ok, message = pcall(self.ws.receive, self.ws)
  if ok then
    return message
  end
  return nil
end

--- Sends one ping per `ping_interval` while an injected client waits.
function WebSocketTransport:_keepalive()
  local now = ws_native.clock()
  if now - (self._last_ping or now) >= self.ping_interval then
    self._last_ping = now
    local text = self:_serialize({ type = MessageType.PING })
    pcall(self.ws.send, self.ws, text)
  end
end

--- Handles one decoded message. Returns true (and the answer or nil, error)
-- when it answers the request `request_id` expecting `expected`.
function WebSocketTransport:_dispatch(data, expected, request_id)
  self:_emit("message_received", { type = data.type, data = data })
  local for_us = data.request_id == nil or data.request_id == request_id
  if data.type == MessageType.PONG then
    self.last_pong = ws_native.clock()
  elseif data.type == MessageType.REMOTE_CHANGE then
    self:_emit("remote_change", { operation = data.operation })
  elseif data.type == MessageType.ERROR and expected and for_us then
    return true, nil, data.error or "Unknown error"
  end
  if expected and data.type == expected and for_us then
    return true, data
  end
  return false
end

--- Handles an event of the native connection (on the Lua thread).
function WebSocketTransport:_on_native_event(event)
  local name = event.name
  if name == "remote_change" then
    local data = { type = MessageType.REMOTE_CHANGE, operation = event.operation }
    self:_emit("message_received", { type = data.type, data = data })
    self:_emit("remote_change", { operation = event.operation })
  elseif name == "message_received" then
    local data = event.message
    if data.type == MessageType.PONG then
      self.last_pong = ws_native.clock()
    end
    self:_emit("message_received", { type = data.type, data = data })
  elseif name == "disconnected" then
    self.connected = false
    self.authenticated = false
    self:_emit("disconnected", { reason = event.reason })
  elseif name == "reconnecting" then
    self.reconnect_attempt = event.attempt
    self:_emit("reconnecting", { attempt = event.attempt, delay = event.delay })
  elseif name == "connected" then
    self.connected = true
    self.authenticated = true
    self.reconnect_attempt = 0
    self:_emit("connected", { ws_url = self.ws_url })
  end
end

function WebSocketTransport:_event_sink()
  return function(event)
    self:_on_native_event(event)
  end
end

--- Sends a message (injected client).
function WebSocketTransport:_send(message_type, data, request_id)
  if not self.connected or not self.authenticated then
    return nil, "Not connected or not authenticated"
  end
  local message = { type = message_type, request_id = request_id }
  for k, v in pairs(data or {}) do
    message[k] = v
  end
  local text, err = self:_serialize(message)
  if not text then
    return nil, err
  end
  local ok, send_err = pcall(self.ws.send, self.ws, text)
  if not ok then
    return nil, "Send failed: " .. tostring(send_err)
  end
  return true
end

--- Waits for the answer to a request (injected client); other messages are
-- handled meanwhile. Time is measured on a monotonic clock.
function WebSocketTransport:_wait_for_response(expected_type, timeout, request_id)
  local deadline = ws_native.clock() + timeout
  while true do
    self:_keepalive()
    local message = self:_receive_injected()
    if message then
      local data = self:_deserialize(message)
      if type(data) == "table" then
        local done, answer, err = self:_dispatch(data, expected_type, request_id)
        if done then
          return answer, err
        end
      end
    elseif ws_native.clock() >= deadline then
      return nil, "Response timeout"
    else
      ws_native.sleep(POLL_INTERVAL)
    end
  end
end

--- Sends a request and returns its answer.
function WebSocketTransport:_call(message_type, fields, expected_type)
  if self:_is_native() then
    self:poll()
  end
  if not self.connected or not self.authenticated then
    return nil, "Not connected or not authenticated"
  end
  local request_id = self.next_request_id
  self.next_request_id = self.next_request_id + 1
  if self:_is_native() then
    return self.ws:request(message_type, fields, self.response_timeout, self:_event_sink())
  end
  local ok, err = self:_send(message_type, fields, request_id)
  if not ok then
    return nil, err
  end
  return self:_wait_for_response(expected_type, self.response_timeout, request_id)
end

--- Fetches operations after a version.
-- @param device_id this device's id
-- @param since_version last server version seen (default 0)
-- @param options optional; `patches = true` lets the server send updates as
--   patches against versions this device has seen (the sync engine asks)
-- @return `{operations, version, has_more, features}` (`features`: what the
-- server offers beyond the old protocol, when it says), or nil and a message
function WebSocketTransport:fetch_operations(device_id, since_version, options)
  if not device_id then
    return nil, "device_id is required"
  end
  local request = { device_id = device_id, since_version = since_version or 0 }
  if options and options.patches then
    request.patches = true
  end
  local response, err = self:_call(MessageType.SYNC_REQUEST, request, MessageType.SYNC_RESPONSE)
  if not response then
    return nil, err
  end
  if type(response.operations) ~= "table" then
    return nil, "Invalid response: missing operations array"
  end
  if type(response.version) ~= "number" then
    return nil, "Invalid response: missing version number"
  end
  return {
    operations = response.operations,
    version = response.version,
    has_more = response.has_more or false,
    features = response.features,
  }
end

--- Pushes operations.
-- @param device_id this device's id
-- @param operations array of operations
-- @return `{success, conflicts, version}`, or nil and a message
function WebSocketTransport:push_operations(device_id, operations)
  if not device_id then
    return nil, "device_id is required"
  end
  if type(operations) ~= "table" then
    return nil, "operations must be a table"
  end
  local response, err = self:_call(MessageType.PUSH_OPERATIONS,
    { device_id = device_id, operations = operations }, MessageType.PUSH_RESPONSE)
  if not response then
    return nil, err
  end
  return {
    success = response.success or false,
    conflicts = response.conflicts or {},
    version = response.version or 0,
    accepted = response.accepted,
  }
end

--- The server's current version (asks for operations after the largest
-- exactly representable version, so none come back).
-- @param device_id this device's id
-- @return `{version}`, or nil and a message
function WebSocketTransport:get_server_version(device_id)
  if not device_id then
    return nil, "device_id is required"
  end
  local response, err = self:_call(MessageType.SYNC_REQUEST,
    { device_id = device_id, since_version = ws_native.version_probe }, MessageType.SYNC_RESPONSE)
  if not response then
    return nil, err
  end
  if type(response.version) ~= "number" then
    return nil, "Invalid response: missing version number"
  end
  return { version = response.version }
end

--- Delivers what arrived since the last call to the registered handlers,
-- waiting up to `timeout` seconds for something to arrive. With an injected
-- client, also retries a failed connection once its backoff delay passed.
-- @param timeout seconds to wait (default 0: do not wait)
-- @return number of events delivered
function WebSocketTransport:step(timeout)
  timeout = timeout or 0
  if self:_is_native() then
    return self.ws:step(timeout, self:_event_sink())
  end
  if not self.websocket_client then
    return 0
  end
  if not self.connected then
    if self._reconnect_at and ws_native.clock() >= self._reconnect_at then
      self._reconnect_at = nil
      self:connect()
    end
    return 0
  end
  local count = 0
  local deadline = ws_native.clock() + timeout
  while true do
    local message = self:_receive_injected()
    if message then
      local data = self:_deserialize(message)
      if type(data) == "table" then
        self:_dispatch(data)
        count = count + 1
      end
    elseif count > 0 or ws_native.clock() >= deadline then
      return count
    else
      ws_native.sleep(POLL_INTERVAL)
    end
  end
end

--- Delivers what arrived since the last call, without waiting.
-- @return number of events delivered
function WebSocketTransport:poll()
  return self:step(0)
end

--- Whether the transport is connected and authenticated (delivers pending
-- events of a native connection first, so a dropped connection shows).
-- @return boolean
function WebSocketTransport:is_connected()
  if self:_is_native() then
    self:poll()
  end
  return self.connected and self.authenticated
end

--- Whether the transport can be used (always: WebSocket is built in).
-- @return true
function WebSocketTransport:is_available()
  return true
end

--- Payload bytes the native connection sent and received.
-- @return `{sent, received}`
function WebSocketTransport:get_traffic()
  if self:_is_native() then
    return self.ws:traffic()
  end
  return { sent = 0, received = 0 }
end

--- Transport description.
-- @return `{type="websocket", ws_url, connected, authenticated, reconnect, ping_interval, websocket_available}`
function WebSocketTransport:get_info()
  return {
    type = "websocket",
    ws_url = self.ws_url,
    connected = self.connected,
    authenticated = self.authenticated,
    reconnect = self.reconnect,
    ping_interval = self.ping_interval,
    websocket_available = true,
  }
end

return WebSocketTransport
