--- HTTP transport for the sync engine: talks to a whisker-sync server over
-- HTTP or HTTPS (`GET /operations`, `POST /operations`, `GET /version`).
--
-- Requests are made natively (rustls, system roots plus an optional
-- `ca_file`). Each attempt may take `timeout` seconds; connection failures,
-- timeouts, HTTP 5xx and 429 are retried up to `max_retries` times with
-- exponential backoff from `retry_delay` seconds (with jitter; a `Retry-After`
-- in seconds is honoured); other statuses are not retried. Failures are
-- returned as `nil, message`, e.g. `"connection refused to http://…/operations"`,
-- `"server returned HTTP 401: invalid API key"`, `"timed out after 30s waiting for …"`.
--
-- `fetch_operations`, `push_operations` and `get_server_version` obtain every
-- response through `self:_request(method, path, body)`, looked up on the
-- instance when called, so an instance's `_request` can be replaced.
--
-- Compression is negotiated: answers are gzip-compressed when large (the
-- transport asks for it and decodes them), and JSON request bodies over
-- 1 KiB are compressed once the server has said it accepts gzip.
--
-- Large assets (docs/USER_GUIDE.md, "Assets") go through `put_asset`,
-- `put_asset_data`, `get_asset` and `asset_status`: content addressed by
-- SHA-256, uploaded in chunks and downloaded as a stream, both resuming
-- after an interruption.
-- @module whisker.storage.sync.transports.http

-- luacheck: ignore 212/self (methods keep the old signatures)

local native = require("whisker.storage.sync.native")
local http = native.http
local json = native.json

local HTTPTransport = {}
HTTPTransport.__index = HTTPTransport

--- Creates a transport. Does not touch the network.
-- @param config table:
--   `base_url` (required), `api_key` (required),
--   `timeout` seconds per attempt (30), `max_retries` retries after the first
--   attempt (3), `retry_delay` first backoff in seconds (1),
--   `user_agent` ("Whisker-Sync/1.0"), `ca_file` PEM file of extra trusted
--   certificates, `max_response_bytes` largest accepted body (64 MiB),
--   `asset_chunk_size` bytes per asset upload request (4 MiB),
--   `compression` (true; false asks for and sends plain bodies only)
-- @return HTTPTransport
function HTTPTransport.new(config)
  local self = setmetatable({}, HTTPTransport)
  self.base_url = config.base_url or error("base_url is required", 2)
  self.api_key = config.api_key or error("api_key is required", 2)
  self.timeout = config.timeout or 30
  self.user_agent = config.user_agent or "Whisker-Sync/1.0"
  self.max_retries = config.max_retries or 3
  self.retry_delay = config.retry_delay or 1
  self.ca_file = config.ca_file
  self.max_response_bytes = config.max_response_bytes
  self.asset_chunk_size = config.asset_chunk_size
  self.is_https = self.base_url:match("^https://") ~= nil
  self.compression = config.compression ~= false
  local client, err = http.client(self.ca_file, self.compression)
  if not client then
    error(err, 2)
  end
  self._native = client
  return self
end

--- Encodes a table as JSON (an empty table is `{}`).
-- @param data table
-- @return JSON text, or nil and `"Failed to serialize JSON: …"`
function HTTPTransport:_serialize(data)
  return json.encode(data)
end

--- Decodes JSON text (JSON null becomes nil).
-- @param json_string text
-- @return table, or nil and `"Empty response body"` / `"Failed to deserialize JSON: …"`
function HTTPTransport:_deserialize(json_string)
  return json.decode(json_string, "Empty response body")
end

--- Request headers: `User-Agent`, `Authorization`, `Accept`, and for a POST
-- with a length `Content-Type` and `Content-Length`.
-- @param method "GET" or "POST"
-- @param content_length body length, for POST
-- @return header table
function HTTPTransport:_build_headers(method, content_length)
  local headers = {
    ["User-Agent"] = self.user_agent,
    ["Authorization"] = "Bearer " .. self.api_key,
    ["Accept"] = "application/json",
  }
  if method == "POST" and content_length then
    headers["Content-Type"] = "application/json"
    headers["Content-Length"] = tostring(content_length)
  end
  return headers
end

--- Makes one request (with retries) to `base_url .. path`.
-- @param method "GET" or "POST"
-- @param path path and query, relative to `base_url`
-- @param body request body text, or nil
-- @return `{status, body, headers, attempts}` for any HTTP answer, or nil and a message
function HTTPTransport:_request(method, path, body)
  local headers = self:_build_headers(method, body and #body or nil)
  return self._native:request(method, self.base_url .. path, headers, body,
    self.timeout, self.max_retries, self.retry_delay, self.max_response_bytes)
end

--- Whole number text for a query parameter (fractions dropped).
local function whole(n)
  return ("%.0f"):format(math.floor(tonumber(n) or 0))
end

--- Fetches operations after a version.
-- @param device_id this device's id
-- @param since_version last server version seen (default 0)
-- @param options optional; `patches = true` lets the server send updates as
--   patches against versions this device has seen (the sync engine asks)
-- @return `{operations, version, has_more, features}` (`features`: what the
-- server offers beyond the old protocol, when it says), or nil and a message
function HTTPTransport:fetch_operations(device_id, since_version, options)
  if not device_id then
    return nil, "device_id is required"
  end
  local path = "/operations?device=" .. self:_url_encode(device_id) .. "&since=" .. whole(since_version or 0)
  if options and options.patches then
    path = path .. "&patches=1"
  end
  local response, err = self:_request("GET", path)
  if not response then
    return nil, err
  end
  return http.parse_fetch(response.status, response.body)
end

--- Pushes operations.
-- @param device_id this device's id
-- @param operations array of operations
-- @return `{success, conflicts, version}` (plus `accepted` from servers that
--   send it), or nil and a message
function HTTPTransport:push_operations(device_id, operations)
  if not device_id then
    return nil, "device_id is required"
  end
  if type(operations) ~= "table" then
    return nil, "operations must be a table"
  end
  local body, serialize_err = json.encode({ device_id = device_id, operations = operations }, { "operations" })
  if not body then
    return nil, serialize_err
  end
  local response, err = self:_request("POST", "/operations", body)
  if not response then
    return nil, err
  end
  return http.parse_push(response.status, response.body)
end

--- The server's current version.
-- @param device_id this device's id
-- @return `{version}`, or nil and a message
function HTTPTransport:get_server_version(device_id)
  if not device_id then
    return nil, "device_id is required"
  end
  local response, err = self:_request("GET", "/version?device=" .. self:_url_encode(device_id))
  if not response then
    return nil, err
  end
  return http.parse_version(response.status, response.body)
end

--- The settings the native asset calls use (read from the instance each time).
-- @return table
function HTTPTransport:_asset_settings()
  return {
    base_url = self.base_url,
    api_key = self.api_key,
    user_agent = self.user_agent,
    timeout = self.timeout,
    max_retries = self.max_retries,
    retry_delay = self.retry_delay,
    chunk_size = self.asset_chunk_size,
  }
end

--- Uploads a file as an asset, in chunks; resumes an upload an earlier call
-- left unfinished, and sends nothing when the server already has it.
-- @param path file to upload (read chunk by chunk, never whole)
-- @return the SHA-256 (64 lower-case hex digits) and
--   `{sha256, size, skipped, resumed_from, sent}`, or nil and a message
function HTTPTransport:put_asset(path)
  if type(path) ~= "string" then
    return nil, "path must be a string"
  end
  local report, err = self._native:put_blob_file(self:_asset_settings(), path)
  if not report then
    return nil, err
  end
  return report.sha256, report
end

--- Uploads a string as an asset (as `put_asset`).
-- @param data the bytes
-- @return the SHA-256 and the report, or nil and a message
function HTTPTransport:put_asset_data(data)
  if type(data) ~= "string" then
    return nil, "data must be a string"
  end
  local report, err = self._native:put_blob_data(self:_asset_settings(), data)
  if not report then
    return nil, err
  end
  return report.sha256, report
end

--- Downloads an asset into a file. Bytes arrive in `<dest_path>.part`,
-- which a later call resumes after an interruption; the file appears under
-- `dest_path` only once its SHA-256 matches.
-- @param sha256 `"sha256:<hex>"` or the bare hex digest
-- @param dest_path where to write it (missing folders are created)
-- @return `{sha256, size, resumed_from, received}`, or nil and a message
function HTTPTransport:get_asset(sha256, dest_path)
  if type(sha256) ~= "string" or type(dest_path) ~= "string" then
    return nil, "sha256 and dest_path must be strings"
  end
  return self._native:get_blob(self:_asset_settings(), sha256, dest_path)
end

--- What the server holds of an asset for this key.
-- @param sha256 `"sha256:<hex>"` or the bare hex digest
-- @return `{sha256, size, received, complete}`, or nil and a message
function HTTPTransport:asset_status(sha256)
  if type(sha256) ~= "string" then
    return nil, "sha256 must be a string"
  end
  return self._native:blob_status(self:_asset_settings(), sha256)
end

--- Percent-encodes a query value (space as `+`; nil gives `""`).
-- @param str text
-- @return encoded text
function HTTPTransport:_url_encode(str)
  return http.url_encode(str)
end

--- Whether the transport can be used (always: HTTP and TLS are built in).
-- @return true
function HTTPTransport:is_available()
  return true
end

--- Bytes this transport sent and received on the network (after
-- compression), assets included.
-- @return `{sent, received}`
function HTTPTransport:get_traffic()
  return self._native:traffic()
end

--- Transport description.
-- @return `{type="http", base_url, is_https, timeout, max_retries, https_available}`
function HTTPTransport:get_info()
  return {
    type = "http",
    base_url = self.base_url,
    is_https = self.is_https,
    timeout = self.timeout,
    max_retries = self.max_retries,
    https_available = true,
  }
end

return HTTPTransport
