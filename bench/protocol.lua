--- Protocol benchmark: the same work through the Lua API of whichever
-- `whisker.storage.sync.protocol` is first on the path (ours, or the old
-- pure-Lua one from whisker-core).
--
--   lua5.4 bench/protocol.lua [label]
--
-- Prints one line per case: name, N, milliseconds per call (median of runs).
local Protocol = require("whisker.storage.sync.protocol")

local label = arg and arg[1] or "protocol"
local clock = os.clock

local function median(samples)
  table.sort(samples)
  return samples[math.ceil(#samples / 2)]
end

--- Times fn (setup returns its arguments) and prints the median per call.
local function measure(name, n, runs, setup, fn)
  local args = { setup() }
  fn(args[1], args[2]) -- warm up
  local samples = {}
  for i = 1, runs do
    collectgarbage()
    local start = clock()
    fn(args[1], args[2])
    samples[i] = (clock() - start) * 1000
  end
  print(("%-10s %-44s N=%-6d %9.3f ms"):format(label, name, n, median(samples)))
end

local function op(side, i, story_id, ts)
  return { id = side .. i, type = "update", story_id = story_id, data = { title = side .. i },
           timestamp = ts, device_id = side == "l" and "device-local" or "device-remote" }
end

--- n local and n remote operations; every `share`-th remote op touches a local story.
local function operation_pairs(n, share)
  return function()
    local l, r = {}, {}
    for i = 1, n do
      l[i] = op("l", i, "story-" .. i, 1000 + i)
      local shared = i % share == 0
      r[i] = op("r", i, shared and ("story-" .. i) or ("other-" .. i), 1001 + i)
    end
    return l, r
  end
end

local function story(i, variant)
  local passages = {}
  for p = 1, 10 do
    passages[p] = { name = "passage " .. p, text = ("Story %d, passage %d. "):format(i, p):rep(8),
                    links = { "passage " .. (p % 10 + 1) }, tags = { "draft" } }
  end
  return { title = "Story " .. i .. variant, author = "writer", passages = passages,
           metadata = { created = 1700000000 + i, tags = { "fiction", "draft" } } }
end

--- 1,000 stories; new state is a deep copy with every 10th story edited,
-- 1% deleted and 1% created (so comparison is by content, never identity).
local function states(n)
  return function()
    local old, new = {}, {}
    for i = 1, n do
      old["story-" .. i] = story(i, "")
      if i % 100 ~= 0 then
        new["story-" .. i] = story(i, i % 10 == 0 and " (edited)" or "")
      end
    end
    for i = n + 1, n + n / 100 do
      new["story-" .. i] = story(i, "")
    end
    return old, new
  end
end

local function vectors(n)
  return function()
    local a, b = {}, {}
    for i = 1, n do
      a["device-" .. i] = i % 7
      b["device-" .. i] = i % 5
    end
    return a, b
  end
end

for _, n in ipairs({ 1000, 10000 }) do
  measure("detect_conflicts, all pairs conflict", n, 15, operation_pairs(n, 1), Protocol.detect_conflicts)
  measure("detect_conflicts, 1% of stories shared", n, 15, operation_pairs(n, 100), Protocol.detect_conflicts)
end
for _, n in ipairs({ 100, 1000, 10000 }) do
  measure("generate_delta", n, 9, states(n), Protocol.generate_delta)
  measure("generate_delta + apply_delta", n, 9, states(n), function(old, new)
    Protocol.apply_delta(old, Protocol.generate_delta(old, new))
  end)
end
for _, n in ipairs({ 1000, 10000 }) do
  measure("compare_version_vectors", n, 15, vectors(n), Protocol.compare_version_vectors)
  if Protocol.merge_version_vectors then
    measure("merge_version_vectors", n, 15, vectors(n), Protocol.merge_version_vectors)
  end
end
