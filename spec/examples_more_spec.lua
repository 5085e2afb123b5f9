-- The newcomer examples (chatbot, filepersist, microchat, stressor, cluster.sh): each started
-- the way its header says, on a free port (PORT=0), used over HTTP, and stopped.
local uv = require "luv"
local async = require "support.async"
local process = require "support.process"
local redis = require "support.redis"
local cjson = require "cjson"

local function post(port, path, body)
  local status, _, answer = async.http(port, { method = "POST", path = path or "/publish",
    headers = { ["Content-Type"] = "application/json" }, body = body })
  return status, answer ~= "" and cjson.decode(answer) or nil
end

local function publish(port, category, data)
  local status, answer = post(port, "/publish", cjson.encode { category = category, data = data })
  assert.equals(200, status)
  assert.same({ success = true }, answer)
end

local function events(port, query, timeout_ms)
  local status, _, body = async.http(port, { path = "/events?" .. query, timeout_ms = timeout_ms })
  assert.equals(200, status)
  return cjson.decode(body)
end

-- Runs fn(child) with the example started as its header says (PORT=0 for a free port).
local function with_example(args, env, fn)
  async.run(function()
    local e = { "PORT=0" }
    for _, v in ipairs(env or {}) do e[#e + 1] = v end
    local child = process.start(args, { env = e })
    local ok, err = pcall(fn, child)
    child:stop("sigterm")
    if not ok then error(err, 0) end
  end, 20000)
end

local function serves_page(port, path, needle)
  local status, headers, body = async.http(port, { path = path })
  assert.equals(200, status)
  assert.matches("text/html", headers["content-type"], 1, true)
  assert.matches(needle, body, 1, true)
  status, headers = async.http(port, { path = "/js/longpoll.js" })
  assert.equals(200, status)
  assert.matches("javascript", headers["content-type"], 1, true)
end

local function tmpfile()
  local path = os.tmpname()
  os.remove(path)
  return path
end

describe("examples (more)", function()
  describe("chatbot.lua", function()
    it("serves the page and its Lua-client bot answers on from-chatbot", function()
      with_example({ "examples/chatbot.lua" }, nil, function(child)
        local port = child.port
        serves_page(port, "/", "longpoll chatbot")
        publish(port, "to-chatbot", { from = "you", text = "Do you like TACOS?" })
        local answer = events(port, "category=from-chatbot&timeout=5&since_time=0", 8000)
        assert.is_table(answer.events, cjson.encode(answer))
        assert.same({ from = "chatbot", text = "I. LOVE. TACOS!!!", re = "Do you like TACOS?" }, answer.events[1].data)
        -- a plain string is a message too; the bot answers every one, in order
        publish(port, "to-chatbot", "what time is it?")
        publish(port, "to-chatbot", "hmm")
        local got
        assert.is_true(async.wait_for(function()
          got = events(port, "category=from-chatbot&timeout=1&since_time=0").events
          return got and #got == 3
        end, 5000))
        assert.matches("^It is %d%d:%d%d:%d%d here%.$", got[2].data.text)
        assert.equals("hmm", got[3].data.re)
        -- the page's own subscription: both directions in one poll
        local both = events(port, "category=to-chatbot&category=from-chatbot&timeout=1&since_time=0").events
        assert.equals(6, #both)
      end)
    end)

    it("--join attaches the bot to another server (say make run's demo)", function()
      async.run(function()
        local server = process.start({ "bin/longpoll", "serve", "--port", "0" })
        local bot = process.start({ "examples/chatbot.lua", "--join", ("http://127.0.0.1:%d/"):format(server.port) },
          { wait_port = false })
        local ok, err = pcall(function()
          assert.is_true(async.wait_for(function() return bot.out:find("chatbot joined", 1, true) ~= nil end, 5000),
            bot.err)
          publish(server.port, "to-chatbot", { text = "coffee?" })
          local answer = events(server.port, "category=from-chatbot&timeout=5&since_time=0", 8000)
          assert.equals("Need. M O R E. Coffee!", answer.events[1].data.text)
        end)
        bot:stop("sigterm")
        server:stop("sigterm")
        if not ok then error(err, 0) end
      end, 20000)
    end)
  end)

  describe("filepersist.lua", function()
    it("keeps events in FILE across a restart, with their ids and every digit", function()
      local file = tmpfile()
      local before
      with_example({ "examples/filepersist.lua" }, { "FILE=" .. file }, function(child)
        assert.matches("0 restored", child.out, 1, true)
        serves_page(child.port, "/", "longpoll demo")
        publish(child.port, "chat", { from = "ada", text = "one" })
        assert.equals(200, (post(child.port, "/publish", '{"category":"chat","data":123456789012345678901234567890}')))
        publish(child.port, "news", "two")
        before = events(child.port, "category=chat&category=news&timeout=1&since_time=0").events
        assert.equals(3, #before)
        assert.equals(0, (child:stop("sigterm")), child.err) -- graceful: pending events are written
        assert.matches("events written to " .. file, child.out, 1, true)
      end)
      with_example({ "examples/filepersist.lua" }, { "FILE=" .. file }, function(child)
        assert.matches("3 restored", child.out, 1, true)
        local status, _, body = async.http(child.port, { path = "/events?category=chat&category=news&timeout=1&since_time=0" })
        assert.equals(200, status)
        assert.matches("123456789012345678901234567890", body, 1, true)
        local after = cjson.decode(body).events
        assert.equals(3, #after)
        for i = 1, 3 do
          assert.equals(before[i].id, after[i].id)
          assert.equals(before[i].timestamp, after[i].timestamp)
        end
        -- a client continuing from its cursor gets only what is new
        publish(child.port, "chat", "after the restart")
        local new = events(child.port, ("category=chat&category=news&timeout=1&since_time=%d&last_id=%s")
          :format(before[3].timestamp, before[3].id)).events
        assert.equals(1, #new)
        assert.equals("after the restart", new[1].data)
      end)
      local f = assert(io.open(file))
      local lines = 0
      for _ in f:lines() do lines = lines + 1 end
      f:close()
      assert.equals(4, lines)
      os.remove(file)
    end)
  end)

  describe("microchat.lua", function()
    it("serves the rooms page, takes chat messages for known rooms only, and keeps the history", function()
      with_example({ "examples/microchat.lua" }, nil, function(child)
        local port = child.port
        serves_page(port, "/?room=sports", "microchat")
        local function say(room, data)
          return post(port, "/post", cjson.encode { category = room, data = data })
        end
        assert.equals(200, (say("news", { name = "ada", text = "hello, news" })))
        assert.equals(200, (say("news", { name = "bob", text = "hi ada" })))
        local status, answer = say("secret", { name = "eve", text = "psst" })
        assert.equals(404, status)
        assert.equals("no such room", answer.error)
        assert.equals(400, (say("news", { name = "eve" })))
        assert.equals(400, (say("news", { name = ("x"):rep(41), text = "long name" })))
        assert.equals(400, (say("news", "just a string")))
        assert.equals(400, (post(port, "/post", "not json")))
        local history = events(port, "category=news&timeout=1&since_time=0").events
        assert.same({ { name = "ada", text = "hello, news" }, { name = "bob", text = "hi ada" } },
          { history[1].data, history[2].data })
        assert.equals(404, (async.http(port, { path = "/events?category=news&category=secret&timeout=1" })))
        -- a waiting member of the room hears the next message
        local waiter = async.spawn(function()
          local got = events(port, "category=humor&timeout=5", 8000).events
          assert.equals("knock knock", got[1].data.text)
        end)
        async.sleep(100)
        assert.equals(200, (say("humor", { name = "bob", text = "knock knock" })))
        async.wait_all { waiter }
      end)
    end)
  end)

  describe("stressor.lua", function()
    it("serve plus publish --count --delay-ms --category --clients: every event arrives once", function()
      with_example({ "examples/stressor.lua", "serve" }, nil, function(server)
        local url = ("http://127.0.0.1:%d/publish"):format(server.port)
        assert.matches("watch: http://127.0.0.1:" .. server.port .. "/?category=stress", server.out, 1, true)
        serves_page(server.port, "/?category=stress", "longpoll demo")
        local pub = process.start({ "examples/stressor.lua", "publish", "--count", "300", "--delay-ms", "0",
          "--category", "load", "--clients", "4", "--url", url }, { wait_port = false })
        assert.equals(0, (pub:wait(15000)), pub.err)
        assert.matches("published 300 of 300 events to \"load\"", pub.out, 1, true)
        assert.matches("; 0 failed", pub.out, 1, true)
        local got = events(server.port, "category=load&timeout=1&since_time=0").events
        assert.equals(300, #got)
        local seen = {}
        for _, e in ipairs(got) do
          local n = math.tointeger(e.data.n) -- lua-cjson decodes numbers as floats
          assert.is_nil(seen[n])
          seen[n] = true
          assert.equals("event #" .. n, e.data.text)
        end
        for n = 1, 300 do assert.is_true(seen[n]) end
        -- --delay-ms spaces one client's publishes out
        local t0 = uv.now()
        pub = process.start({ "examples/stressor.lua", "publish", "--count", "4", "--delay-ms", "100", "--url", url },
          { wait_port = false })
        assert.equals(0, (pub:wait(10000)), pub.err)
        assert.is_true(uv.now() - t0 >= 250) -- three waits of 100 ms (timers may round down a little)
        local stress = events(server.port, "category=stress&timeout=1&since_time=0").events
        assert.equals(4, #stress)
        assert.is_true(stress[4].data.sent_at - stress[1].data.sent_at >= 250)
      end)
    end)

    it("reports failures and bad flags with its exit status", function()
      async.run(function()
        local pub = process.start({ "examples/stressor.lua", "publish", "--count", "2", "--url", "http://127.0.0.1:1/publish" },
          { wait_port = false })
        assert.equals(1, (pub:wait(10000)))
        assert.matches("published 0 of 2 events", pub.out, 1, true)
        assert.matches("ECONNREFUSED", pub.err, 1, true)
        local bad = process.start({ "examples/stressor.lua", "publish", "--count", "many" }, { wait_port = false })
        assert.equals(2, (bad:wait(5000)))
        assert.matches("--count needs a whole number", bad.err, 1, true)
      end, 20000)
    end)
  end)

  describe("cluster.sh", function()
    local pipe = io.popen("lua5.4 bin/longpoll serve --help")
    local help = pipe:read("a")
    pipe:close()
    local ready = help:find("--redis", 1, true) and redis.available()

    -- Runs `bash examples/cluster.sh` with env; returns the child (out, err, exited, stop).
    local function start_cluster(env)
      local stdout, stderr = uv.new_pipe(false), uv.new_pipe(false)
      local child = { out = "", err = "", exited = async.event() }
      local full_env = { "PATH=" .. os.getenv("PATH") }
      for _, e in ipairs(env) do full_env[#full_env + 1] = e end
      local handle, pid = uv.spawn("bash", { args = { "examples/cluster.sh" }, stdio = { nil, stdout, stderr },
        env = full_env }, function(code, signal)
        child.exited:set(code, signal)
      end)
      assert(handle, pid)
      stdout:read_start(function(_, data)
        if data then child.out = child.out .. data elseif not stdout:is_closing() then stdout:close() end
      end)
      stderr:read_start(function(_, data)
        if data then child.err = child.err .. data elseif not stderr:is_closing() then stderr:close() end
      end)
      function child.stop(signal)
        if not child.exited.is_set then handle:kill(signal or "sigterm") end
        local code, sig = child.exited:wait(10000)
        if code == nil then
          handle:kill("sigkill")
          code, sig = child.exited:wait(2000)
        end
        for _, p in ipairs { stdout, stderr } do if not p:is_closing() then p:close() end end
        if not handle:is_closing() then handle:close() end
        return code, sig
      end
      return child
    end

    local function ports_of(out)
      local ports = {}
      for p in out:gmatch("longpoll listening on http://127%.0%.0%.1:(%d+)/") do ports[#ports + 1] = tonumber(p) end
      return ports
    end

    local function refuses(port)
      local tcp = uv.new_tcp()
      local done = async.event()
      tcp:connect("127.0.0.1", port, function(err) done:set(err ~= nil) end)
      local refused = done:wait(2000)
      tcp:close()
      return refused
    end

    local test = ready and it or pending
    test("three nodes on one Redis: publish on one, hear it on the others; SIGTERM stops all three", function()
      local r = redis.start()
      local ok, err = pcall(async.run, function()
        local cluster = start_cluster { "REDIS_URL=" .. r.url, "PORTS=0 0 0", "PREFIX=example-cluster:" }
        local inner_ok, inner_err = pcall(function()
          local ports
          assert.is_true(async.wait_for(function()
            ports = ports_of(cluster.out)
            return #ports == 3
          end, 8000), cluster.out .. cluster.err)
          serves_page(ports[3], "/", "longpoll demo")
          publish(ports[1], "chat", { from = "node1", text = "hello cluster" })
          for i = 2, 3 do
            local got = events(ports[i], "category=chat&timeout=2&since_time=0").events
            assert.equals("hello cluster", got[1].data.text)
          end
          -- a poll waiting on node 3 is answered by a publish on node 2
          local waiter = async.spawn(function()
            local got = events(ports[3], "category=live&timeout=5", 8000).events
            assert.equals("from node 2", got[1].data)
          end)
          async.sleep(200)
          publish(ports[2], "live", "from node 2")
          async.wait_all { waiter }
          assert.equals(0, (cluster.stop("sigterm")), cluster.err)
          for i = 1, 3 do assert.is_true(refuses(ports[i]), "node " .. i .. " stopped") end
        end)
        cluster.stop("sigkill")
        if not inner_ok then error(inner_err, 0) end
      end, 30000)
      r:stop()
      if not ok then error(err, 0) end
    end)

    test("exits with a hint when Redis does not answer", function()
      async.run(function()
        local cluster = start_cluster { "REDIS_URL=redis://127.0.0.1:" .. redis.free_port() .. "/0", "PORTS=0 0 0" }
        local code = cluster.exited:wait(10000)
        cluster.stop("sigkill")
        assert.is_true(code ~= nil and code ~= 0)
        assert.matches("is Redis answering at", cluster.err, 1, true)
      end, 20000)
    end)
  end)
end)
