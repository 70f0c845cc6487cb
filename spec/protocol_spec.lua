local Protocol = require("whisker.storage.sync.protocol")

local UPDATE, DELETE, CREATE = "update", "delete", "create"

local function op(id, op_type, story_id, data, timestamp, device_id, extra)
  local o = { id = id, type = op_type, story_id = story_id, data = data,
              timestamp = timestamp or 100, device_id = device_id or "device-a" }
  for k, v in pairs(extra or {}) do
    o[k] = v
  end
  return o
end

local function conflict(local_op, remote_op)
  return { story_id = local_op.story_id, local_version = local_op, remote_version = remote_op }
end

-- Deterministic pseudo-random generator so failures reproduce.
local function generator(seed)
  local state = seed
  return function(n)
    state = (state * 1103515245 + 12345) % 2147483648
    return state % n + 1
  end
end

local function random_story(rand)
  local passages = {}
  for i = 1, rand(4) - 1 do
    passages[i] = { name = "p" .. rand(9), text = ("t"):rep(rand(5)), tags = { "a", "b" } }
  end
  local story = { title = "T" .. rand(5), passages = passages }
  if rand(2) == 1 then
    story.meta = { rating = rand(3), nested = { deep = rand(2) == 1 } }
  end
  return story
end

local function random_state(rand)
  local state = {}
  for i = 1, rand(8) - 1 do
    state["story-" .. rand(10)] = random_story(rand)
    state["story-" .. i] = random_story(rand)
  end
  return state
end

local function deep_equal(a, b)
  if type(a) ~= "table" or type(b) ~= "table" then
    return a == b
  end
  for k, v in pairs(a) do
    if not deep_equal(v, b[k]) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return true
end

describe("protocol constants", function()
  it("names the operation types", function()
    assert.same({ CREATE = "create", UPDATE = "update", DELETE = "delete",
                  METADATA_UPDATE = "metadata_update" }, Protocol.OperationType)
  end)

  it("names the conflict strategies", function()
    assert.same({ LAST_WRITE_WINS = "last_write_wins", MANUAL = "manual",
                  AUTO_MERGE = "auto_merge", KEEP_BOTH = "keep_both" }, Protocol.ConflictStrategy)
  end)

  it("gives each load its own constant tables", function()
    package.loaded["whisker.storage.sync.protocol"] = nil
    local again = require("whisker.storage.sync.protocol")
    assert.are_not.equal(Protocol.OperationType, again.OperationType)
    assert.same(Protocol.OperationType, again.OperationType)
  end)
end)

describe("create_operation", function()
  it("stamps a fresh UUID v4 id and the current time in seconds", function()
    local before = os.time()
    local o = Protocol.create_operation(CREATE, "story-1", { title = "A" })
    assert.matches("^%x%x%x%x%x%x%x%x%-%x%x%x%x%-4%x%x%x%-[89ab]%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$", o.id)
    assert.is_true(o.timestamp >= before and o.timestamp <= os.time())
    assert.equal(math.floor(o.timestamp), o.timestamp)
  end)

  it("keeps the caller's data table", function()
    local data = { title = "A" }
    assert.equal(data, Protocol.create_operation(UPDATE, "story-1", data).data)
  end)

  it("never repeats an id", function()
    local seen = {}
    for _ = 1, 1000 do
      local id = Protocol.create_operation(UPDATE, "s", {}).id
      assert.is_nil(seen[id])
      seen[id] = true
    end
  end)

  it("takes the device from the metadata, else 'unknown'", function()
    local meta = { device_id = "laptop" }
    local o = Protocol.create_operation(UPDATE, "s", {}, meta)
    assert.equal("laptop", o.device_id)
    assert.equal(meta, o.metadata)
    local bare = Protocol.create_operation(DELETE, "s")
    assert.equal("unknown", bare.device_id)
    assert.same({}, bare.metadata)
    assert.is_nil(bare.data)
  end)
end)

describe("detect_conflicts", function()
  it("finds nothing when different stories changed", function()
    local conflicts = Protocol.detect_conflicts({ op("1", UPDATE, "a") }, { op("2", UPDATE, "b") })
    assert.same({}, conflicts)
  end)

  it("reports a story changed on both sides, whatever the time between the changes", function()
    local l = op("1", UPDATE, "a", { title = "L" }, 100)
    local r = op("2", UPDATE, "a", { title = "R" }, 100 + 3600)
    local conflicts = Protocol.detect_conflicts({ l }, { r })
    assert.equal(1, #conflicts)
    local c = conflicts[1]
    assert.equal("a", c.story_id)
    assert.equal("concurrent_update", c.conflict_type)
    assert.equal(l, c.local_version)
    assert.equal(r, c.remote_version)
    assert.same({ l }, c.local_operations)
    assert.same({ r }, c.remote_operations)
  end)

  it("groups every operation of a story and compares the latest", function()
    local l1, l2 = op("1", UPDATE, "a"), op("2", DELETE, "a")
    local r1 = op("3", UPDATE, "a")
    local c = Protocol.detect_conflicts({ l1, op("x", UPDATE, "z"), l2 }, { r1 })[1]
    assert.equal(2, #c.local_operations)
    assert.equal(l1, c.local_operations[1])
    assert.equal(l2, c.local_version)
    assert.equal("delete_update_conflict", c.conflict_type)
  end)

  it("names each kind of conflict", function()
    local function kind(lt, rt)
      return Protocol.detect_conflicts({ op("1", lt, "a") }, { op("2", rt, "a") })[1].conflict_type
    end
    assert.equal("concurrent_update", kind(UPDATE, UPDATE))
    assert.equal("delete_update_conflict", kind(DELETE, UPDATE))
    assert.equal("update_delete_conflict", kind(UPDATE, DELETE))
    assert.equal("unknown", kind(CREATE, UPDATE))
    assert.equal("concurrent_update", kind("UPDATE", "Update"))
  end)

  it("does not report changes made one after the other", function()
    local remote = op("2", UPDATE, "a", nil, 100, "b", { version = 7 })
    local based_on_it = op("1", UPDATE, "a", nil, 90, "a", { base_version = 7 })
    local based_on_older = op("1", UPDATE, "a", nil, 90, "a", { base_version = 6 })
    assert.same({}, Protocol.detect_conflicts({ based_on_it }, { remote }))
    assert.equal(1, #Protocol.detect_conflicts({ based_on_older }, { remote }))
  end)

  it("does not report a story both sides deleted", function()
    assert.same({}, Protocol.detect_conflicts({ op("1", DELETE, "a") }, { op("2", DELETE, "a") }))
  end)

  it("lists conflicts in the order stories first appear locally", function()
    local locals = { op("1", UPDATE, "z"), op("2", UPDATE, "m"), op("3", UPDATE, "a") }
    local remotes = { op("4", UPDATE, "a"), op("5", UPDATE, "z"), op("6", UPDATE, "m") }
    local ids = {}
    for i, c in ipairs(Protocol.detect_conflicts(locals, remotes)) do
      ids[i] = c.story_id
    end
    assert.same({ "z", "m", "a" }, ids)
  end)

  it("matches story ids of every length by content, not by string object", function()
    -- Each side builds its own strings: long ones are separate objects in Lua 5.4.
    local function id(len, last)
      return table.concat({ ("s"):rep(len - 1), last })
    end
    local locals, remotes, expected = {}, {}, {}
    for len = 1, 120 do
      locals[#locals + 1] = op("l" .. len, UPDATE, id(len, "x"))
      locals[#locals + 1] = op("m" .. len, UPDATE, id(len, "x"))
      remotes[#remotes + 1] = op("r" .. len, UPDATE, id(len, "y"))
      if len % 3 == 0 then
        remotes[#remotes + 1] = op("s" .. len, UPDATE, id(len, "x"))
        expected[#expected + 1] = id(len, "x")
      end
    end
    local found = {}
    for i, c in ipairs(Protocol.detect_conflicts(locals, remotes)) do
      found[i] = c.story_id
      assert.equal(2, #c.local_operations)
      assert.equal(1, #c.remote_operations)
    end
    assert.same(expected, found)
  end)

  it("raises a clear error for malformed input", function()
    assert.has_error(function() Protocol.detect_conflicts(nil, {}) end,
      "bad argument #1 to 'detect_conflicts' (table expected, got nil)")
    assert.has_error(function() Protocol.detect_conflicts({ 42 }, {}) end,
      "local_ops[1] is not an operation table")
    assert.has_error(function() Protocol.detect_conflicts({}, { { type = UPDATE } }) end,
      "remote_ops[1].story_id must be a string")
  end)
end)

describe("resolve_conflict", function()
  local l, r
  before_each(function()
    l = op("op-l", UPDATE, "s", { title = "Local", author = "Ann", nested = { x = 1, same = true } }, 100, "device-a")
    r = op("op-r", UPDATE, "s", { title = "Remote", description = "D", nested = { y = 2, same = true } },
      102, "device-b")
  end)

  describe("last_write_wins", function()
    it("picks the later change and returns the caller's tables", function()
      local res = Protocol.resolve_conflict(conflict(l, r), "last_write_wins")
      assert.equal("remote", res.winner)
      assert.equal(r.data, res.data)
      assert.equal(r, res.operation)
    end)

    it("breaks timestamp ties by device id, then operation id", function()
      r.timestamp = l.timestamp
      assert.equal("remote", Protocol.resolve_conflict(conflict(l, r), "last_write_wins").winner)
      r.device_id = l.device_id
      assert.equal("remote", Protocol.resolve_conflict(conflict(l, r), "last_write_wins").winner)
      r.id = "op-a"
      assert.equal("local", Protocol.resolve_conflict(conflict(l, r), "last_write_wins").winner)
    end)

    it("picks the same operation on both replicas", function()
      r.timestamp = l.timestamp
      local here = Protocol.resolve_conflict(conflict(l, r), "last_write_wins").operation
      local there = Protocol.resolve_conflict(conflict(r, l), "last_write_wins").operation
      assert.equal(here, there)
    end)

    it("says which timestamp is missing", function()
      l.timestamp = nil
      assert.has_error(function() Protocol.resolve_conflict(conflict(l, r), "last_write_wins") end,
        "conflict.local_version.timestamp must be a number")
    end)
  end)

  describe("auto_merge", function()
    it("keeps fields from both sides and merges nested tables", function()
      local res = Protocol.resolve_conflict(conflict(l, r), "auto_merge")
      assert.equal("merged", res.winner)
      assert.same({ title = "Remote", author = "Ann", description = "D",
                    nested = { x = 1, y = 2, same = true } }, res.data)
      assert.equal(res.data, res.operation.data)
      assert.same({ type = "update", story_id = "s", timestamp = 102, device_id = "merged", data = res.data },
        res.operation)
    end)

    it("gives the same result on both replicas", function()
      local here = Protocol.resolve_conflict(conflict(l, r), "auto_merge").data
      local there = Protocol.resolve_conflict(conflict(r, l), "auto_merge").data
      assert.same(here, there)
    end)

    it("replaces arrays as a whole rather than mixing their items", function()
      l.data = { tags = { "a", "b", "c" } }
      r.data = { tags = { "x" } }
      assert.same({ tags = { "x" } }, Protocol.resolve_conflict(conflict(l, r), "auto_merge").data)
    end)

    it("keeps an edit that raced a delete", function()
      r.type, r.data = DELETE, nil
      local res = Protocol.resolve_conflict(conflict(l, r), "auto_merge")
      assert.same(l.data, res.data)
      assert.equal("update", res.operation.type)
    end)

    it("leaves the inputs untouched", function()
      local before = { title = "Local", author = "Ann", nested = { x = 1, same = true } }
      Protocol.resolve_conflict(conflict(l, r), "auto_merge")
      assert.same(before, l.data)
    end)

    it("reports data that cannot be synced", function()
      l.data = { on_enter = function() end }
      assert.has_error(function() Protocol.resolve_conflict(conflict(l, r), "auto_merge") end,
        "conflict.local_version.data: a function value cannot be synced at on_enter")
      local cyclic = {}
      cyclic.self = cyclic
      l.data = cyclic
      assert.has_error(function() Protocol.resolve_conflict(conflict(l, r), "auto_merge") end,
        "conflict.local_version.data: cyclic table at self")
    end)
  end)

  describe("keep_both", function()
    it("returns two renamed copies pointing at the original", function()
      local res = Protocol.resolve_conflict(conflict(l, r), "keep_both")
      assert.equal("both", res.winner)
      assert.are_not.equal(res.local_copy.story_id, res.remote_copy.story_id)
      assert.matches("^s%-local%-", res.local_copy.story_id)
      assert.matches("^s%-remote%-", res.remote_copy.story_id)
      assert.equal(l.data, res.local_copy.data)
      assert.same({ original_id = "s", source = "remote" }, res.remote_copy.metadata)
    end)

    it("derives the copies' ids from the operations, not the clock", function()
      local first = Protocol.resolve_conflict(conflict(l, r), "keep_both")
      local again = Protocol.resolve_conflict(conflict(l, r), "keep_both")
      assert.equal(first.local_copy.story_id, again.local_copy.story_id)
    end)
  end)

  describe("manual", function()
    it("returns what the resolver returns", function()
      local seen
      local res = Protocol.resolve_conflict(conflict(l, r), "manual", function(c)
        seen = c
        return { winner = "custom", data = { title = "Mine" } }
      end)
      assert.equal("s", seen.story_id)
      assert.same({ winner = "custom", data = { title = "Mine" } }, res)
    end)

    it("requires a resolver", function()
      assert.has_error(function() Protocol.resolve_conflict(conflict(l, r), "manual") end,
        "Manual strategy requires resolver_fn")
    end)
  end)

  it("rejects an unknown strategy by name", function()
    assert.has_error(function() Protocol.resolve_conflict(conflict(l, r), "coin_flip") end,
      "Unknown conflict strategy: coin_flip")
    assert.has_error(function() Protocol.resolve_conflict(conflict(l, r), nil) end,
      "Unknown conflict strategy: nil")
  end)

  it("says what is missing from a hand-built conflict", function()
    assert.has_error(function() Protocol.resolve_conflict({ story_id = "s" }, "last_write_wins") end,
      "conflict.local_version must be an operation table")
  end)
end)

describe("generate_delta", function()
  it("emits create, update and delete in story-id order", function()
    local delta = Protocol.generate_delta(
      { a = { title = "A" }, b = { title = "B" } },
      { b = { title = "B2" }, c = { title = "C" } })
    local summary = {}
    for i, o in ipairs(delta) do
      summary[i] = o.type .. ":" .. o.story_id
    end
    assert.same({ "delete:a", "update:b", "create:c" }, summary)
    assert.is_nil(delta[1].data)
    assert.equal("B2", delta[2].data.title)
  end)

  it("compares stories by content, not identity", function()
    local old = { s = { title = "A", passages = { { text = "x" } }, meta = {} } }
    local new = { s = { title = "A", passages = { { text = "x" } }, meta = {} } }
    assert.same({}, Protocol.generate_delta(old, new))
  end)

  it("sees a change deep inside a story", function()
    local old = { s = { passages = { { text = "x", tags = { "a" } } } } }
    local new = { s = { passages = { { text = "x", tags = { "b" } } } } }
    assert.equal(1, #Protocol.generate_delta(old, new))
  end)

  it("treats NaN as equal to itself and integers as equal to equal floats", function()
    local nan = 0 / 0
    assert.same({}, Protocol.generate_delta({ s = { v = nan, n = 1 } }, { s = { v = nan, n = 1.0 } }))
  end)

  it("rejects state keys that are not story ids", function()
    assert.has_error(function() Protocol.generate_delta({}, { [1] = {} }) end,
      "new_state keys must be story id strings, got a number")
  end)

  it("reports cyclic stories instead of looping", function()
    local a, b = {}, {}
    a.self, b.self = a, b
    assert.has_error(function() Protocol.generate_delta({ s = a }, { s = b }) end,
      'comparing story "s": tables nested deeper than 100 levels')
  end)
end)

describe("apply_delta", function()
  it("returns a new state and leaves the input alone", function()
    local current = { a = { title = "A" } }
    local next_state = Protocol.apply_delta(current, { op("1", CREATE, "b", { title = "B" }), op("2", DELETE, "a") })
    assert.same({ b = { title = "B" } }, next_state)
    assert.same({ a = { title = "A" } }, current)
  end)

  it("updates metadata on a copy of the story", function()
    local story = { title = "A" }
    local next_state = Protocol.apply_delta({ a = story }, { op("1", "metadata_update", "a", { tags = { "x" } }) })
    assert.same({ title = "A", metadata = { tags = { "x" } } }, next_state.a)
    assert.is_nil(story.metadata)
  end)

  it("ignores metadata for a story it does not have and unknown operation types", function()
    local next_state = Protocol.apply_delta({}, { op("1", "metadata_update", "a", {}), op("2", "rename", "b", {}) })
    assert.same({}, next_state)
  end)

  it("undoes generate_delta: apply_delta(a, generate_delta(a, b)) equals b", function()
    for seed = 1, 300 do
      local rand = generator(seed)
      local a, b = random_state(rand), random_state(rand)
      local result = Protocol.apply_delta(a, Protocol.generate_delta(a, b))
      assert.is_true(deep_equal(result, b), "seed " .. seed)
      assert.same({}, Protocol.generate_delta(result, b), "seed " .. seed)
    end
  end)
end)

describe("version vectors", function()
  it("start empty and record versions per device", function()
    local v = Protocol.create_version_vector()
    assert.same({}, v)
    assert.equal(v, Protocol.update_version_vector(v, "d1", 5))
    assert.same({ d1 = 5 }, v)
  end)

  it("compare as a partial order, missing entries counting as zero", function()
    assert.equal("equal", Protocol.compare_version_vectors({ a = 1, b = 0 }, { a = 1 }))
    assert.equal("before", Protocol.compare_version_vectors({ a = 1 }, { a = 1, b = 1 }))
    assert.equal("after", Protocol.compare_version_vectors({ a = 2, b = 1 }, { a = 1 }))
    assert.equal("concurrent", Protocol.compare_version_vectors({ a = 2 }, { b = 1 }))
  end)

  it("merge to the entry-wise maximum without touching the inputs", function()
    local v1, v2 = { a = 3, b = 1 }, { b = 4, c = 2 }
    assert.same({ a = 3, b = 4, c = 2 }, Protocol.merge_version_vectors(v1, v2))
    assert.same({ a = 3, b = 1 }, v1)
  end)

  it("merge commutatively, associatively and idempotently", function()
    for seed = 1, 200 do
      local rand = generator(seed)
      local function vector()
        local v = {}
        for _ = 1, rand(4) - 1 do v["d" .. rand(4)] = rand(5) - 1 end
        return v
      end
      local a, b, c = vector(), vector(), vector()
      local merge, compare = Protocol.merge_version_vectors, Protocol.compare_version_vectors
      assert.equal("equal", compare(merge(a, b), merge(b, a)))
      assert.equal("equal", compare(merge(merge(a, b), c), merge(a, merge(b, c))))
      assert.equal("equal", compare(merge(a, a), a))
      assert.is_true(compare(a, merge(a, b)) ~= "after" and compare(a, merge(a, b)) ~= "concurrent")
    end
  end)

  it("reject versions that are not integers", function()
    assert.has_error(function() Protocol.compare_version_vectors({ a = "x" }, {}) end,
      'version for device "a" must be an integer')
  end)
end)
