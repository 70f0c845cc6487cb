-- A stand-in for the story editor, for the demo and the end-to-end test:
-- writes, deletes and lists the stories of the device folder it runs in
-- (./.whisker-storage), through whisker-core's StorageService when it loads
-- (WHISKER_CORE names a checkout) and whisker-sync's file store otherwise —
-- the same two stores `whisker sync` uses.
--
--   lua5.4 scripts/story.lua save <id> <title> [text]
--   lua5.4 scripts/story.lua delete <id>
--   lua5.4 scripts/story.lua list            (one "id  title" line per story)

local root = ((arg and arg[0] or ""):match("^(.*)[/\\]scripts[/\\][^/\\]*$") or ".")
local flavour = type(jit) == "table" and "luajit" or ("lua" .. _VERSION:match("%d+%.%d+"))
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
package.cpath = root .. "/build/" .. flavour .. "/?.so;" .. package.cpath
local core = os.getenv("WHISKER_CORE")
if core and core ~= "" then
  package.path = package.path .. ";" .. core .. "/lib/?.lua;" .. core .. "/lib/?/init.lua"
end

local function open()
  local ok, Storage = pcall(require, "whisker.storage")
  if ok and type(Storage) == "table" then
    local storage = Storage.new({ backend = "filesystem", path = ".whisker-storage" })
    assert(storage:initialize())
    return storage
  end
  local storage = require("whisker.sync.file_store").new({ path = ".whisker-storage" })
  assert(storage:initialize())
  return storage
end

local action, id, title, text = arg[1], arg[2], arg[3], arg[4]
local storage = open()
if action == "save" and id and title then
  assert(storage:save_story(id, {
    id = id,
    title = title,
    passages = { { name = "Start", text = text or ("The story of " .. title .. ".") } },
  }))
elseif action == "delete" and id then
  assert(storage:delete_story(id))
elseif action == "list" then
  local lines = {}
  for _, entry in ipairs(storage:list_stories()) do
    if entry.id:sub(1, 1) ~= "_" then
      local story = storage:load_story(entry.id)
      lines[#lines + 1] = ("%-28s %s"):format(entry.id, story and tostring(story.title) or "?")
    end
  end
  table.sort(lines)
  if #lines == 0 then
    print("(no stories)")
  end
  for _, line in ipairs(lines) do
    print(line)
  end
else
  io.stderr:write("usage: story.lua save <id> <title> [text] | delete <id> | list\n")
  os.exit(2)
end
