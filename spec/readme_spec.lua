-- README.md's Lua snippets run: each fenced ```lua block, in its own lua5.4 process from the
-- repository root, as a newcomer would run it. The HTML comment on the line before a block says
-- how:
--   (none)               runs to its end (a guard timer stops a hung loop and fails the test);
--                        "8101" in it points at a `bin/longpoll serve` started for it
--   <!-- serves: NAME --> a server: "8101" becomes a free port, the checks NAME run against it
--                        over HTTP, then SIGTERM stops its loop (the guard timer stops it too)
--   <!-- fragment -->    part of a program: it must compile
-- The file path "/tmp/longpoll-readme.log" becomes a temporary file.
local uv = require "luv"
local async = require "support.async"
local process = require "support.process"
local cjson = require "cjson"

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

local function write(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

local function replace(s, old, new)
  local out, i = {}, 1
  while true do
    local a, b = s:find(old, i, true)
    if not a then break end
    out[#out + 1] = s:sub(i, a - 1) .. new
    i = b + 1
  end
  out[#out + 1] = s:sub(i)
  return table.concat(out)
end

local README = read("README.md")

-- { line = first code line, mode = "run"|"serves"|"fragment", name =, text = } per ```lua block,
-- and the ```sh blocks as { line =, text = }.
local function blocks(text)
  local lua, sh = {}, {}
  local lines = {}
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do lines[#lines + 1] = line end
  local i = 1
  while i <= #lines do
    local lang = lines[i]:match("^```(%w+)%s*$")
    if lang then
      local start, body = i + 1, {}
      i = i + 1
      while i <= #lines and not lines[i]:match("^```%s*$") do
        body[#body + 1] = lines[i]
        i = i + 1
      end
      assert(i <= #lines, "README.md:" .. start .. ": unclosed code block")
      local prev = start - 2
      while prev > 0 and lines[prev]:match("^%s*$") do prev = prev - 1 end
      local marker = prev > 0 and lines[prev]:match("^<!%-%- (.-) %-%->$") or nil
      local block = { line = start, text = table.concat(body, "\n") .. "\n" }
      if lang == "lua" then
        if marker == "fragment" then
          block.mode = "fragment"
        elseif marker and marker:match("^serves: ") then
          block.mode, block.name = "serves", marker:match("^serves: (%S+)$")
        else
          block.mode = "run"
        end
        lua[#lua + 1] = block
      elseif lang == "sh" then
        sh[#sh + 1] = block
      end
    end
    i = i + 1
  end
  return lua, sh
end

local SNIPPETS, SHELL = blocks(README)

-- Runs a snippet file: a guard timer and SIGTERM stop its loop; the last line says how it ended.
local RUNNER = [[
local path, name, guard_ms = arg[1], arg[2], tonumber(arg[3])
local uv = require "luv"
local stopped_by
local guard = uv.new_timer()
guard:start(guard_ms, 0, function() stopped_by = stopped_by or "guard"; uv.stop() end)
guard:unref()
local term = uv.new_signal()
term:start("sigterm", function() stopped_by = stopped_by or "SIGTERM"; uv.stop() end)
term:unref()
local f = assert(io.open(path, "rb"))
local chunk = assert(load(f:read("a"), "=" .. name))
f:close()
chunk()
io.stdout:write("\nsnippet: ", stopped_by and ("stopped by " .. stopped_by) or "done", "\n")
io.stdout:flush()
os.exit(0)
]]

local function free_port()
  local tcp = uv.new_tcp()
  assert(tcp:bind("127.0.0.1", 0))
  local port = tcp:getsockname().port
  tcp:close()
  return port
end

local function accepts(port)
  local tcp = uv.new_tcp()
  local done = async.event()
  tcp:connect("127.0.0.1", port, function(err) done:set(err == nil) end)
  local ok = done:wait(1000)
  tcp:close()
  return ok == true
end

local function http_json(port, opts)
  local status, headers, body = async.http(port, opts)
  return status, cjson.decode(body), headers
end

-- The README's ```sh lines that start with curl and name 127.0.0.1:8101, in order.
local function curl_lines(after_line)
  for _, b in ipairs(SHELL) do
    if b.line > after_line then
      local out = {}
      for line in b.text:gmatch("[^\n]+") do
        if line:match("^curl ") and line:find("127.0.0.1:8101", 1, true) then out[#out + 1] = line end
      end
      return out
    end
  end
  return {}
end

-- Checks run against a "serves" snippet while it listens on port.
local CHECKS = {
  quickstart = function(port, snippet)
    local status, answer = http_json(port, { path = "/events?category=news&timeout=1&since_time=0" })
    assert.equals(200, status)
    assert.equals("hello", answer.events[1].data.headline)
    status, answer = http_json(port, { method = "POST", path = "/publish", body = '{"category":"news","data":"hi"}' })
    assert.equals(200, status)
    assert.same({ success = true }, answer)
    -- the two curl lines printed under the quickstart, as written (port aside)
    local curls = curl_lines(snippet.line)
    assert.equals(2, #curls)
    if os.execute("command -v curl >/dev/null 2>&1") then
      local outputs = {}
      for i, line in ipairs(curls) do
        -- (env -u: under `make test-asan` curl would inherit LD_PRELOAD=libasan and can hang)
        local cmd = replace(line, "127.0.0.1:8101", "127.0.0.1:" .. port)
          :gsub("^curl ", "env -u LD_PRELOAD -u ASAN_OPTIONS curl -s --max-time 5 ")
        local p = io.popen(cmd)
        outputs[i] = p:read("a")
        p:close()
      end
      local events = cjson.decode(outputs[1]).events
      assert.equals("hello", events[1].data.headline)
      assert.equals("hi", events[2].data)
      assert.same({ success = true }, cjson.decode(outputs[2]))
    end
  end,
  extensions = function(port)
    local status, answer = http_json(port, { method = "POST", path = "/publish", body = '{"category":"b","data":2}' })
    assert.equals(200, status)
    assert.same({ success = true }, answer)
    status, answer = http_json(port, { path = "/events?category=a&category=b&timeout=1&since_time=0" })
    assert.equals(200, status)
    assert.equals("b", answer.events[1].category)
    status, answer = http_json(port, { path = "/stats" })
    assert.equals(200, status)
    assert.equals(1, answer.published)
    local head = async.raw(port, "GET /sse?category=a HTTP/1.1\r\nHost: x\r\n\r\n", { wait_close = false })
    assert.matches("^HTTP/1.1 200", head)
    assert.matches("text/event-stream", head, 1, true)
  end,
}

describe("README.md", function()
  it("keeps the sections others fill in, the two commands, and links that resolve", function()
    for _, words in ipairs { "make run", "make test", "luarocks" } do
      assert.truthy(README:find(words, 1, true), words)
    end
    for _, heading in ipairs { "Two commands", "Quickstart", "Wrapping handlers", "Clients", "Add-ons and persistence",
      "Scale-out over Redis", "Extensions: several categories, SSE, stats, CORS", "Options", "HTTP API",
      "Performance", "Robustness", "Limits", "Differences from golongpoll" } do
      assert.truthy(README:find("\n## " .. heading .. "\n", 1, true), "section " .. heading)
    end
    local broken = {}
    for target in README:gmatch("%]%(([^)#]+)[^)]*%)") do
      local f = not target:match("^https?://") and io.open(target)
      if f then f:close() elseif f == nil then broken[#broken + 1] = target end
    end
    assert.same({}, broken)
  end)

  it("has Lua snippets, and every one compiles", function()
    assert.is_true(#SNIPPETS >= 5)
    for _, s in ipairs(SNIPPETS) do
      local ok, err = load(("\n"):rep(s.line - 1) .. s.text, "=README.md")
      assert(ok, err)
    end
    local counts = { run = 0, serves = 0, fragment = 0 }
    for _, s in ipairs(SNIPPETS) do counts[s.mode] = counts[s.mode] + 1 end
    assert.is_true(counts.run >= 2 and counts.serves >= 2, cjson.encode(counts))
  end)

  it("the quickstart is ten lines", function()
    for _, s in ipairs(SNIPPETS) do
      if s.name == "quickstart" then
        local _, n = s.text:gsub("\n", "")
        assert.is_true(n <= 10, n .. " lines")
        return
      end
    end
    error("no quickstart snippet")
  end)

  for _, snippet in ipairs(SNIPPETS) do
    if snippet.mode ~= "fragment" then
      it(("runs the snippet at README.md:%d (%s)"):format(snippet.line, snippet.name or snippet.mode), function()
        local dir = os.tmpname()
        os.remove(dir)
        assert(os.execute("mkdir -p '" .. dir .. "'"))
        local runner, file, log = dir .. "/runner.lua", dir .. "/snippet.lua", dir .. "/events.log"
        write(runner, RUNNER)
        local ok, err = pcall(async.run, function()
          local server, port
          local text = replace(snippet.text, "/tmp/longpoll-readme.log", log)
          if snippet.mode == "serves" then
            port = free_port()
          elseif text:find("8101", 1, true) then
            server = process.start({ "bin/longpoll", "serve", "--port", "0" })
            port = server.port
          end
          if port then text = replace(text, "8101", tostring(port)) end
          write(file, ("\n"):rep(snippet.line - 1) .. text) -- errors name README.md's own lines
          local child = process.start({ runner, file, "README.md",
            snippet.mode == "serves" and "6000" or "8000" }, { wait_port = false })
          local inner_ok, inner_err = pcall(function()
            if snippet.mode == "serves" then
              assert.is_true(async.wait_for(function() return child.code ~= nil or accepts(port) end, 5000))
              assert.is_nil(child.code, child.err)
              local check = CHECKS[snippet.name]
              assert(check, "no checks named " .. tostring(snippet.name))
              check(port, snippet)
              assert.equals(0, (child:stop("sigterm", 5000)), child.err)
              assert.matches("snippet: stopped by SIGTERM\n$", child.out)
            else
              assert.equals(0, (child:wait(10000)), child.err)
              assert.matches("snippet: done\n$", child.out)
            end
            assert.equals("", child.err)
            if snippet.text:find("/tmp/longpoll-readme.log", 1, true) then
              local stored = read(log)
              local _, lines = stored:gsub("\n", "")
              assert.equals(1, lines)
              assert.matches('"data":"kept on disk"', stored, 1, true)
            end
          end)
          child:stop("sigkill")
          if server then server:stop("sigterm") end
          if not inner_ok then error(inner_err, 0) end
        end, 25000)
        os.execute("rm -rf '" .. dir .. "'")
        if not ok then error(err, 0) end
      end)
    end
  end
end)
