--- Assets and compression through the Lua HTTP transport, against the real
-- reference server: `put_asset` / `put_asset_data` / `get_asset` /
-- `asset_status`, de-duplication, resuming a download from its `.part`
-- file, hash checks, and negotiated gzip for story pushes and fetches.

local HTTPTransport = require("whisker.storage.sync.transports.http")
local native = require("whisker.storage.sync.native")
local reference_server = require("support.reference_server")
local files = require("support.files")
local noise = require("support.bytes").noise
local tempdir, read, write = files.tempdir, files.read, files.write

describe("assets through the HTTP transport", function()
  local server = reference_server.each_test()
  local dir

  before_each(function()
    dir = tempdir()
  end)

  after_each(function()
    files.remove_tree(dir)
  end)

  local function transport(extra)
    local config = { base_url = server.url, api_key = server.api_key, timeout = 5, max_retries = 1,
                     retry_delay = 0.05 }
    for k, v in pairs(extra or {}) do
      config[k] = v
    end
    return HTTPTransport.new(config)
  end

  it("uploads a file in chunks, downloads it, and sends nothing the second time", function()
    local t = transport({ asset_chunk_size = 64 * 1024 })
    local data = noise(300 * 1024, 7)
    write(dir .. "/cave.png", data)
    local sha, report = t:put_asset(dir .. "/cave.png")
    assert.equals(native.blob.sha256(data), sha)
    assert.equals(#data, report.size)
    assert.is_false(report.skipped)
    assert.is_true(report.sent >= #data)

    local status = assert(t:asset_status("sha256:" .. sha))
    assert.is_true(status.complete)
    assert.equals(#data, status.size)

    local got = assert(t:get_asset("sha256:" .. sha, dir .. "/copy/cave.png"))
    assert.equals(#data, got.size)
    assert.equals(data, read(dir .. "/copy/cave.png"))
    assert.is_nil(read(dir .. "/copy/cave.png.part"))

    local again_sha, again = t:put_asset(dir .. "/cave.png")
    assert.equals(sha, again_sha)
    assert.is_true(again.skipped)
    assert.equals(0, again.sent)
  end)

  it("uploads strings and compresses what compresses", function()
    local t = transport()
    assert(t:get_server_version("probe"))
    local text = ("The lantern swung in the draught. "):rep(20000)
    local sha, report = t:put_asset_data(text)
    assert.equals(native.blob.sha256(text), sha)
    assert.is_true(report.sent * 10 < #text, "sent " .. report.sent .. " for " .. #text)
    local before = t:get_traffic().received
    local got = assert(t:get_asset(sha, dir .. "/text.txt"))
    assert.equals(text, read(dir .. "/text.txt"))
    assert.is_true(t:get_traffic().received - before < #text / 10)
    assert.is_true(got.received < #text / 10)
  end)

  it("resumes a download from the partial file an interrupted one left", function()
    local t = transport()
    local data = noise(200 * 1024, 3)
    local sha = assert(t:put_asset_data(data))
    write(dir .. "/asset.bin.part", data:sub(1, 120 * 1024))
    local got = assert(t:get_asset(sha, dir .. "/asset.bin"))
    assert.equals(120 * 1024, got.resumed_from)
    assert.equals(#data - 120 * 1024, got.received)
    assert.equals(data, read(dir .. "/asset.bin"))

    -- A partial file that does not belong to the asset fails the hash check and is removed.
    write(dir .. "/bad.bin.part", ("x"):rep(1000))
    local none, err = t:get_asset(sha, dir .. "/bad.bin")
    assert.is_nil(none)
    assert.matches("does not match sha256:" .. sha, err, 1, true)
    assert.is_nil(read(dir .. "/bad.bin.part"))
    assert.is_nil(read(dir .. "/bad.bin"))
  end)

  it("reports what it cannot do as nil and a message", function()
    local t = transport()
    local missing = native.blob.sha256("never uploaded")
    local none, err = t:get_asset(missing, dir .. "/missing")
    assert.is_nil(none)
    assert.equals("asset sha256:" .. missing .. " is not on the server", err)
    none, err = t:asset_status("sha256:nope")
    assert.is_nil(none)
    assert.matches("is not a SHA%-256", err)
    none, err = t:put_asset(dir .. "/no-such-file")
    assert.is_nil(none)
    assert.matches("^cannot read .*no%-such%-file", err)
    none, err = t:put_asset(42)
    assert.is_nil(none)
    assert.equals("path must be a string", err)
    local wrong = transport({ api_key = "not-the-key" })
    none, err = wrong:put_asset_data("x")
    assert.is_nil(none)
    assert.equals("server returned HTTP 401: invalid API key", err)
    local down = transport({ base_url = "http://127.0.0.1:9", max_retries = 0 })
    none, err = down:asset_status(missing)
    assert.is_nil(none)
    assert.matches("connection refused", err)
  end)

  it("compresses story pushes once the server said it takes gzip, and fetches always", function()
    local passages = {}
    for i = 1, 300 do
      passages[i] = { name = "p" .. i, text = "The corridor bends left; rain drums on the roof. [[Go on]]" }
    end
    local op = { id = "op-1", type = "create", story_id = "corridor", timestamp = os.time(),
                 device_id = "laptop", data = { title = "Corridor", passages = passages } }
    local raw = #native.json.encode({ device_id = "laptop", operations = { op } })
    local laptop = transport()
    assert(laptop:get_server_version("laptop"))
    local before = laptop:get_traffic().sent
    local pushed = assert(laptop:push_operations("laptop", { op }))
    assert.is_true(pushed.success)
    local sent = laptop:get_traffic().sent - before
    assert.is_true(sent * 5 < raw, ("push of %d JSON bytes sent %d"):format(raw, sent))

    local desktop = transport()
    local fetched = assert(desktop:fetch_operations("desktop", 0))
    assert.equals("p300", fetched.operations[1].data.passages[300].name)
    assert.is_true(desktop:get_traffic().received * 5 < raw)

    -- Switched off, both directions are plain, as with the old client.
    local plain = transport({ compression = false })
    assert(plain:get_server_version("plain"))
    op.id = "op-2"
    before = plain:get_traffic().sent
    assert(plain:push_operations("plain", { op }))
    assert.is_true(plain:get_traffic().sent - before > raw * 0.9)
    before = plain:get_traffic().received
    assert(plain:fetch_operations("other", 0))
    assert.is_true(plain:get_traffic().received - before > raw * 0.9)
  end)
end)
