--- Protocol benchmark: the same calls through the Lua API of our
-- `whisker.storage.sync.protocol` and, when a whisker-core `lib/` directory is
-- given, the old pure-Lua one, loaded side by side in one process.
--
--   lua5.4 bench/protocol.lua [--case N] [whisker-core/lib]
--
-- Ours must be first on LUA_PATH/LUA_CPATH. Each case runs in a fresh process
-- of the same interpreter (or only case N, in this one), so that no case's heap
-- layout depends on the cases before it. Each run times both implementations
-- back to back on the same input tables (alternating which goes first), after a
-- full collection each, so both see the same heap and the same moment's
-- machine. Prints one line per case: name, N, median milliseconds per call of
-- each, and the old median over ours.
local MODULE = "whisker.storage.sync.protocol"

--- Requires the module afresh with `prefix` searched first, then forgets it
-- so the other implementation can load under the same name.
local function load_protocol(prefix)
  local saved = package.path
  package.path = prefix .. saved
  package.loaded[MODULE] = nil
  local protocol = require(MODULE)
  package.loaded[MODULE] = nil
  package.path = saved
  return protocol
end

local only_case, old_lib
if arg[1] == "--case" then
  only_case, old_lib = tonumber(arg[2]), arg[3]
else
  old_lib = arg[1]
end
local ours = load_protocol("")
local old = old_lib and load_protocol(("%s/?.lua;%s/?/init.lua;"):format(old_lib, old_lib))

local clock = os.clock

local function median(samples)
  table.sort(samples)
  return samples[math.ceil(#samples / 2)]
end

local function time_call(fn, a, b)
  collectgarbage()
  local start = clock()
  fn(a, b)
  return (clock() - start) * 1000
end

--- Times `call(protocol, a, b)` for each implementation, where `setup`
-- returns a and b, and prints the medians. `new_in_ours` marks functions the
-- old protocol lacks.
local function measure(name, n, runs, setup, call, new_in_ours)
  local a, b = setup()
  local compared = old and not new_in_ours
  local impls = { ours }
  if compared then
    impls[2] = old
  end
  local fns, samples = {}, {}
  for i, protocol in ipairs(impls) do
    fns[i] = function(x, y)
      return call(protocol, x, y)
    end
    samples[i] = {}
    fns[i](a, b) -- warm up
  end
  for run = 1, runs do
    for k = 0, #impls - 1 do
      local i = (run + k) % #impls + 1
      samples[i][run] = time_call(fns[i], a, b)
    end
  end
  local ours_ms = median(samples[1])
  if compared then
    local old_ms = median(samples[2])
    print(("%-40s N=%-6d old %9.3f ms  ours %9.3f ms  %6.1fx"):format(
      name, n, old_ms, ours_ms, old_ms / ours_ms))
  else
    print(("%-40s N=%-6d ours %9.3f ms"):format(name, n, ours_ms))
  end
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

--- n stories; new state is a deep copy with every 10th story edited,
-- 1% deleted and 1% created (so comparison is by content, never identity).
local function states(n)
  return function()
    local old_state, new_state = {}, {}
    for i = 1, n do
      old_state["story-" .. i] = story(i, "")
      if i % 100 ~= 0 then
        new_state["story-" .. i] = story(i, i % 10 == 0 and " (edited)" or "")
      end
    end
    for i = n + 1, n + n / 100 do
      new_state["story-" .. i] = story(i, "")
    end
    return old_state, new_state
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

local function method(name)
  return function(protocol, a, b)
    return protocol[name](a, b)
  end
end

local unpack = table.unpack or unpack
local cases = {}
local function case(...)
  cases[#cases + 1] = { n = select("#", ...), ... }
end

for _, n in ipairs({ 1000, 10000 }) do
  case("detect_conflicts, all pairs conflict", n, 15, operation_pairs(n, 1), method("detect_conflicts"))
  case("detect_conflicts, 1% of stories shared", n, 15, operation_pairs(n, 100),
       method("detect_conflicts"))
end
for _, n in ipairs({ 100, 1000, 10000 }) do
  case("generate_delta", n, 9, states(n), method("generate_delta"))
  case("generate_delta + apply_delta", n, 9, states(n), function(protocol, a, b)
    return protocol.apply_delta(a, protocol.generate_delta(a, b))
  end)
end
for _, n in ipairs({ 1000, 10000 }) do
  case("compare_version_vectors", n, 15, vectors(n), method("compare_version_vectors"))
  case("merge_version_vectors (new)", n, 15, vectors(n), method("merge_version_vectors"), true)
end

if only_case then
  measure(unpack(cases[only_case], 1, cases[only_case].n))
else
  for n = 1, #cases do
    local command = ("%q %q --case %d %s"):format(arg[-1], arg[0], n, old_lib and ("%q"):format(old_lib) or "")
    local child = assert(io.popen(command))
    io.write(child:read("*a"))
    assert(child:close(), "case " .. n .. " failed")
  end
end
