-- docs/api.md cannot drift from the code: every public function of the module tables and method
-- tables (fields not starting with "_") is documented there, every name documented there exists,
-- and the option tables list exactly the options the functions accept.
local longpoll = require "longpoll"
local parser = require "longpoll.http.parser"
local request = require "longpoll.http.request"
local response = require "longpoll.http.response"
local options_mod = require "longpoll.options"

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

local DOC = read("docs/api.md")

-- Names the page documents: the code span that starts a heading, and the code spans in the first
-- cell of a table row. Rows under "<!-- options: FUNCTION -->" are that function's options.
local function parse_doc(text)
  local names, options = {}, {}
  local current_options
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do
    local marker = line:match("^<!%-%- options: ([%w_.]+) %-%->$")
    if marker then
      current_options = {}
      options[marker] = current_options
    elseif line:match("^%s*$") then
      current_options = nil
    else
      local heading = line:match("^#+%s+`([^`]+)`")
      if heading then
        names[#names + 1] = heading:match("^[%w_.:]+")
      end
      local cell = line:match("^|([^|]*)|")
      if cell then
        for span in cell:gmatch("`([^`]+)`") do
          local name = span:match("^[%w_.:]+")
          if current_options then current_options[#current_options + 1] = name else names[#names + 1] = name end
        end
      end
    end
  end
  return names, options
end

local documented_list, documented_options = parse_doc(DOC)
local documented = {}
for _, n in ipairs(documented_list) do documented[n] = true end

-- Keys of a block `local NAME = {` ... `}` in a source file: the first key of each line, or
-- every `key = true` when the block is a set. Used where a module keeps a list to itself.
local function source_keys(path, block, set)
  local src = read(path)
  local body = src:match("\nlocal " .. block .. " = {\n(.-)\n}")
  assert(body, "no block " .. block .. " in " .. path)
  local keys = {}
  if set then
    for k in body:gmatch("([%a_][%w_]*)%s*=%s*true") do keys[#keys + 1] = k end
  else
    for line in body:gmatch("[^\n]+") do
      local k = line:match("^%s*([%a_][%w_]*)%s*=%s*[^=]")
      if k then keys[#keys + 1] = k end
    end
  end
  assert(#keys > 0, "block " .. block .. " in " .. path .. " is empty")
  return keys
end

local function sorted(t)
  table.sort(t)
  return t
end

-- Public keys of a table: not starting with "_"; functions only unless all = true.
local function public(t, all)
  local out = {}
  for k, v in pairs(t) do
    if type(k) == "string" and k:sub(1, 1) ~= "_" and (all or type(v) == "function") then out[#out + 1] = k end
  end
  return sorted(out)
end

-- The objects behind the names, made the way applications make them.
local manager = assert(longpoll.start {})
local srv = assert(longpoll.server.new {})
local client = assert(longpoll.client.new { subscribe_url = "http://127.0.0.1:1/events", category = "c" })
local file_addon = assert(longpoll.addons.file { path = "/nonexistent/never-opened.log" }) -- opened by on_start only
local limits = { max_header_bytes = 16384, max_body_bytes = 1048576, max_url_bytes = 8192 }
local p = parser.new(limits)
p:push("POST /x?a=1&a=2 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
local req = assert(request.new(assert(p:parse()), "127.0.0.1:9"))
local res = response.new({ closed = false }, req)

-- Lazily loaded modules, from the tables their modules keep of them.
for _, name in ipairs(source_keys("lua/longpoll/init.lua", "LAZY")) do assert(longpoll[name]) end
for _, name in ipairs(source_keys("lua/longpoll/addons/init.lua", "LAZY")) do assert(longpoll.addons[name]) end

local HOOKS = {}
for _, k in ipairs(public(file_addon)) do if k:match("^on_") then HOOKS[k] = true end end

-- prefix -> the names that must be documented under it
local SURFACES = {
  ["longpoll."] = public(longpoll, true),
  ["longpoll.server."] = public(longpoll.server, true),
  ["longpoll.client."] = public(longpoll.client, true),
  ["longpoll.addons."] = public(longpoll.addons, true),
  ["longpoll.addons.file."] = public(longpoll.addons.file, true),
  ["manager:"] = public(getmetatable(manager).__index),
  ["manager."] = public(manager),
  ["server:"] = public(getmetatable(srv).__index),
  ["req:"] = public(request.methods), -- __index is a function: it also makes req.query on demand
  ["res:"] = public(getmetatable(res).__index),
  ["client:"] = public(longpoll.client.Client),
  ["file_addon:"] = (function()
    local out = {}
    for _, k in ipairs(public(file_addon)) do if not HOOKS[k] then out[#out + 1] = k end end
    return out
  end)(),
  ["add_on."] = sorted((function()
    local out = {}
    for k in pairs(HOOKS) do out[#out + 1] = k end
    return out
  end)()),
}

-- Whether a documented name exists in the code (nil, reason when it does not).
local function exists(name)
  local prefix, rest = name:match("^(longpoll%.)(.+)$")
  if prefix then
    local t = longpoll
    for segment in rest:gmatch("[^.]+") do
      if type(t) ~= "table" then return nil, "not a table on the way" end
      t = t[segment]
    end
    return t ~= nil
  end
  local obj, sep, key = name:match("^([%w_]+)([:.])([%w_]+)$")
  if not obj then return nil, "not a name this page may use" end
  if obj == "add_on" then
    -- a hook the manager knows: it refuses a non-function under that name
    local m, err = longpoll.start { add_on = { [key] = true } }
    if m then m:shutdown() end -- the manager did not care about that key: not a hook (closed in teardown)
    return err ~= nil and err:find("'" .. key .. "' must be a function", 1, true) ~= nil
  end
  local target = ({ manager = manager, server = srv, req = req, res = res, client = client, file_addon = file_addon })[obj]
  if not target then return nil, "unknown object '" .. obj .. "'" end
  if sep == ":" then return type(target[key]) == "function" end
  return target[key] ~= nil or (obj == "req" and key == "remote_addr" and req.remote_addr ~= nil)
end

describe("docs/api.md", function()
  teardown(function()
    manager:shutdown()
    -- the manager closes its timers on the next loop turns; let them run, so later specs that
    -- count open handles start clean
    require("support.async").run(function() require("support.async").sleep(20) end)
  end)

  it("documents a good number of names (the parser found the page's entries)", function()
    assert.is_true(#documented_list > 60, "only " .. #documented_list .. " names found")
  end)

  local prefixes = {}
  for prefix in pairs(SURFACES) do prefixes[#prefixes + 1] = prefix end
  for _, prefix in ipairs(sorted(prefixes)) do
    local names = SURFACES[prefix]
    it("documents every public name under " .. prefix, function()
      local missing = {}
      for _, name in ipairs(names) do
        if not documented[prefix .. name] then missing[#missing + 1] = prefix .. name end
      end
      assert.same({}, missing)
    end)
  end

  it("documents nothing that does not exist", function()
    local wrong = {}
    for _, name in ipairs(documented_list) do
      local ok, why = exists(name)
      if not ok then wrong[#wrong + 1] = name .. (why and (" (" .. why .. ")") or "") end
    end
    assert.same({}, wrong)
  end)

  -- For each function taking options: the option names the code knows, and a probe that tells
  -- whether it accepts a name (a nonsense value gets a message naming the option, not "unknown").
  local weird = coroutine.create(function() end)
  local OPTIONS = {
    ["longpoll.start"] = {
      known = function()
        local keys = source_keys("lua/longpoll/options.lua", "SPEC")
        for k in pairs(assert(options_mod.check({}))) do keys[#keys + 1] = k end
        return keys
      end,
      probe = function(name) return select(2, longpoll.start { [name] = weird }) end,
    },
    ["longpoll.server.new"] = {
      known = function()
        local keys = source_keys("lua/longpoll/server.lua", "DEFAULTS")
        keys[#keys + 1] = "logger"
        return keys
      end,
      probe = function(name) return select(2, longpoll.server.new { [name] = weird }) end,
    },
    ["longpoll.client.new"] = {
      known = function() return source_keys("lua/longpoll/client.lua", "KNOWN", true) end,
      probe = function(name)
        local o = { subscribe_url = "http://127.0.0.1:1/events", category = "c" }
        o[name] = weird
        return select(2, longpoll.client.new(o))
      end,
    },
    ["longpoll.addons.file"] = {
      known = function() return source_keys("lua/longpoll/addons/file.lua", "KNOWN", true) end,
      probe = function(name)
        local o = { path = "/tmp/x" }
        o[name] = weird
        return select(2, longpoll.addons.file(o))
      end,
    },
  }

  for _, fn in ipairs { "longpoll.start", "longpoll.server.new", "longpoll.client.new", "longpoll.addons.file" } do
    local o = OPTIONS[fn]
    it("lists exactly the options of " .. fn, function()
      local listed = documented_options[fn]
      assert.is_table(listed, "no <!-- options: " .. fn .. " --> table")
      local is_listed = {}
      for _, name in ipairs(listed) do is_listed[name] = true end
      local missing = {}
      for _, name in ipairs(o.known()) do
        if not is_listed[name] then missing[name] = true end
      end
      assert.same({}, missing)
      local unknown = {}
      for _, name in ipairs(listed) do
        local err = o.probe(name)
        if not err or err:find("unknown option", 1, true) then unknown[#unknown + 1] = name end
      end
      assert.same({}, unknown)
    end)
  end

  it("the checker itself notices drift", function()
    local names, opts = parse_doc(table.concat({
      "### `manager:publish(category, data)`",
      "### `manager:no_such_method()`",
      "| `client:poll` | internal |",
      "<!-- options: longpoll.start -->",
      "| option | default |",
      "|---|---|",
      "| `max_event_buffer_size` | 250 |",
      "",
      "| `req.path` | the path |",
    }, "\n"))
    assert.same({ "manager:publish", "manager:no_such_method", "client:poll", "req.path" }, names)
    assert.same({ "max_event_buffer_size" }, opts["longpoll.start"])
    assert.is_true(exists("manager:publish"))
    assert.is_false(exists("manager:no_such_method"))
    assert.is_false(exists("longpoll.addons.nothing"))
    assert.is_false(exists("add_on.on_whatever"))
    assert.is_true(exists("add_on.on_publish"))
    assert.is_nil((exists("manger:publish")))
    local _, err = longpoll.start { no_such_option = 1 }
    assert.matches("unknown option", err)
  end)
end)
