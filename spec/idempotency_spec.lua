-- Idempotent publish (issue 17, part 1): the Idempotency-Key header over real sockets and
-- manager:publish's idempotency_key, in memory and in Redis mode (a private redis-server).
local async = require "support.async"
local redis = require "support.redis"
local longpoll = require "longpoll"
local server = require "longpoll.server"
local core = require "longpoll.core"
local cjson = require "cjson"

local wait_until = async.wait_or_fail

local FAST = { reconnect_min_ms = 20, reconnect_max_ms = 200, command_timeout_ms = 2000, connect_timeout_ms = 1000 }

-- A transport that can hold the answers of publish scripts (a publish stays in flight).
local function holding_transport()
  local t = { held = {}, holding = false }
  t.option = {
    reply = function(name, reply, err, deliver)
      if name == "publish" and t.holding then
        t.held[#t.held + 1] = function() deliver(reply, err) end
        return
      end
      deliver(reply, err)
    end,
  }
  function t.release()
    t.holding = false
    local held = t.held
    t.held = {}
    for _, f in ipairs(held) do f() end
  end
  return t
end

-- A node: a manager (memory, or Redis at url) behind its own HTTP server.
local function start_node(options, url)
  local o = {}
  for k, v in pairs(options or {}) do o[k] = v end
  local transport = holding_transport()
  if url then
    -- cache = false: a read right after a publish goes to Redis (the node-local cache may not
    -- have the event from pub/sub yet; the read-path specs of the Redis engine do the same)
    o.redis = { url = url, transport = transport.option, cache = false }
    for k, v in pairs(FAST) do o.redis[k] = v end
  end
  local m = assert(longpoll.start(o))
  local srv = assert(server.new { host = "127.0.0.1", port = 0 })
  srv:route("GET", "/events", m.subscription_handler)
  srv:route("*", "/publish", m.publish_handler)
  -- a wrapper: the publish is the Lua handler's (the engine's C path takes only unwrapped ones)
  srv:route("*", "/lua-publish", function(req, res) return m.publish_handler(req, res) end)
  srv:route("GET", "/stats", m.stats_handler)
  local node = { manager = m, srv = srv, port = assert(srv:listen()), transport = transport }
  -- status, raw body, decoded body, headers (path: /publish unless given)
  function node.publish(category, data_json, key, path)
    local body = '{"category":' .. cjson.encode(category) .. ',"data":' .. data_json .. "}"
    local status, h, rbody = async.http(node.port, { method = "POST", path = path or "/publish", body = body,
      headers = key and { ["Idempotency-Key"] = key } or nil })
    local ok, decoded = pcall(cjson.decode, rbody)
    return status, rbody, ok and decoded or nil, h
  end
  function node.events(category)
    local _, _, body = async.http(node.port, { path = "/events?timeout=1&since_time=0&category=" .. category })
    return cjson.decode(body).events or {}
  end
  function node.stats()
    local _, _, body = async.http(node.port, { path = "/stats" })
    return cjson.decode(body)
  end
  if url then
    wait_until("node online", function() return m:stats().redis_online end)
  end
  return node
end

local function stop_node(node)
  local stopped = async.event()
  node.manager:shutdown(function() stopped:set(true) end)
  assert(stopped:wait(5000), "manager did not shut down")
  local closed = async.event()
  node.srv:close(function() closed:set(true) end)
  assert(closed:wait(5000), "server did not close")
end

local modes = { { name = "memory" } }
if redis.available() then
  modes[2] = { name = "Redis" }
else
  describe("idempotent publish in Redis mode", function() pending("redis-server is not installed") end)
end

for _, mode in ipairs(modes) do
  describe("idempotent publish (" .. mode.name .. ")", function()
    local R
    setup(function() if mode.name == "Redis" then R = redis.start() end end)
    teardown(function() if R then R:stop() end end)

    -- Runs fn(node, ...) with n nodes; options are the managers' (Redis mode: on one redis-server).
    local function with_nodes(options, n, fn)
      async.run(function()
        if R then R:cli("FLUSHALL") end
        local nodes = {}
        for i = 1, n do nodes[i] = start_node(options, R and R.url) end
        local ok, err = pcall(fn, table.unpack(nodes))
        for _, node in ipairs(nodes) do stop_node(node) end
        if not ok then error(err, 0) end
      end, 20000)
    end

    it("answers exactly {\"success\":true} without the header", function()
      with_nodes({}, 1, function(node)
        local status, raw, _, h = node.publish("plain", '{"n":1}')
        assert.equals(200, status)
        assert.equals('{"success":true}', raw)
        assert.is_nil(h["idempotent-replayed"])
        assert.equals(1, #node.events("plain"))
      end)
    end)

    if mode.name == "memory" then
      it("serves keyed publishes in the engine's C path with the Lua handler's bytes", function()
        with_nodes({}, 1, function(node)
          local function same_headers(a, b)
            a.date, b.date = nil, nil
            assert.same(a, b)
          end
          local before = node.srv:fast_answers()
          local s1, first, _, h1 = node.publish("fast", '{"n":1}', "c-key")
          assert.equals(200, s1)
          assert.matches('^{"success":true,"id":"[%x-]+","timestamp":%d+}$', first)
          assert.is_nil(h1["idempotent-replayed"])
          assert.equals(before + 1, node.srv:fast_answers())
          -- a replay, in C and in Lua: the same answer, naming the first event
          local _, again, _, h2 = node.publish("fast", '{"n":1}', "c-key")
          local _, lua_again, _, h3 = node.publish("fast", '{"n":1}', "c-key", "/lua-publish")
          assert.equals(before + 2, node.srv:fast_answers())
          assert.same({ first, first }, { again, lua_again })
          assert.equals("true", h2["idempotent-replayed"])
          same_headers(h3, h2)
          -- a key set by the Lua handler is replayed by C, quoted or not (the same key)
          local _, lua_first = node.publish("fast", '{"n":2}', "lua-key", "/lua-publish")
          local _, c_replay = node.publish("fast", '{"n":2}', '"lua-key"')
          assert.equals(before + 3, node.srv:fast_answers())
          assert.equals(lua_first, c_replay)
          -- another request under a used key: 422 from both
          local s4, mismatch, _, h4 = node.publish("fast", '{"n":3}', "c-key")
          local s5, lua_mismatch, _, h5 = node.publish("fast", '{"n":3}', "c-key", "/lua-publish")
          assert.equals(before + 4, node.srv:fast_answers())
          assert.same({ 422, 422 }, { s4, s5 })
          assert.equals('{"error":"Idempotency-Key was already used with a different request"}', mismatch)
          assert.equals(mismatch, lua_mismatch)
          same_headers(h5, h4)
          -- a bad key is the Lua handler's to explain
          local s6, bad = node.publish("fast", '{"n":4}', '"a\\b"')
          assert.equals(400, s6)
          assert.matches("Idempotency%-Key", bad)
          assert.equals(before + 4, node.srv:fast_answers())
          -- stored once per key, each count once per request
          assert.equals(2, #node.events("fast"))
          local st = node.stats()
          assert.same({ 2, 3, 2 }, { st.idempotency_keys, st.idempotency_replays, st.idempotency_conflicts })
        end)
      end)
    end

    it("publishes once per key and replays the first answer, naming the event", function()
      with_nodes({}, 1, function(node)
        local s1, raw1, first, h1 = node.publish("orders", '{"n":1}', "key-1")
        assert.equals(200, s1)
        assert.is_true(first.success)
        assert.is_true(core.is_uuid(first.id))
        assert.matches('^{"success":true,"id":"[0-9a-f%-]+","timestamp":%d+}$', raw1)
        assert.is_nil(h1["idempotent-replayed"])
        for _ = 1, 3 do
          local s2, raw2, _, h2 = node.publish("orders", '{"n":1}', "key-1")
          assert.equals(200, s2)
          assert.equals(raw1, raw2)
          assert.equals("true", h2["idempotent-replayed"])
        end
        local events = node.events("orders")
        assert.equals(1, #events)
        assert.equals(first.id, events[1].id)
        assert.equals(first.timestamp, events[1].timestamp)
        -- a quoted key (the draft's structured-field string) is the same key
        local s3, raw3, _, h3 = node.publish("orders", '{"n":1}', '"key-1"')
        assert.equals(200, s3)
        assert.equals(raw1, raw3)
        assert.equals("true", h3["idempotent-replayed"])
        -- another key publishes
        local s4, _, other = node.publish("orders", '{"n":1}', "key-2")
        assert.equals(200, s4)
        assert.are_not.equal(first.id, other.id)
        assert.equals(2, #node.events("orders"))
        local st = node.stats()
        if not R then assert.equals(2, st.published) end
        assert.equals(4, st.idempotency_replays)
      end)
    end)

    it("refuses the key with another body (422) and malformed keys (400), publishing nothing", function()
      with_nodes({}, 1, function(node)
        assert.equals(200, (node.publish("a", '{"n":1}', "k")))
        local status, _, body = node.publish("a", '{"n":2}', "k")
        assert.equals(422, status)
        assert.matches("different request", body.error)
        status = node.publish("b", '{"n":1}', "k")
        assert.equals(422, status)
        for _, bad in ipairs { ("x"):rep(256), "caf\195\169", "tab\there", '"quo"te"' } do
          status, _, body = node.publish("a", '{"n":3}', bad)
          assert.equals(400, status, bad)
          assert.matches("Idempotency%-Key", body.error)
        end
        -- an empty value: the header sent with nothing after the colon
        local raw = async.raw(node.port, 'POST /publish HTTP/1.1\r\nHost: x\r\nIdempotency-Key:\r\n'
          .. 'Content-Length: 29\r\nConnection: close\r\n\r\n{"category":"a","data":{"n":4}}', { timeout_ms = 5000 })
        assert.matches("^HTTP/1%.1 400", raw)
        assert.equals(1, #node.events("a"))
        assert.equals(0, #node.events("b"))
        assert.equals(200, (node.publish("a", '{"n":5}', ("y"):rep(255))))
        assert.is_true(node.stats().idempotency_conflicts >= 2)
      end)
    end)

    it("publishes again once the window has passed", function()
      with_nodes({ idempotency_window_seconds = 0.3 }, 1, function(node)
        local _, _, first = node.publish("w", '{"n":1}', "wk")
        local again
        wait_until("the key is forgotten after its window", function()
          local _, _, body, h = node.publish("w", '{"n":1}', "wk")
          if h["idempotent-replayed"] then return false end
          again = body
          return true
        end, 10000)
        assert.are_not.equal(first.id, again.id)
        assert.equals(2, #node.events("w"))
      end)
    end)

    it("keeps at most idempotency_max_keys keys, the oldest going first", function()
      with_nodes({ idempotency_max_keys = 3 }, 1, function(node)
        for i = 1, 5 do assert.equals(200, (node.publish("m", ('{"n":%d}'):format(i), "k" .. i))) end
        if R then
          assert.equals("3", R:cli("ZCARD longpoll:keys"):match("%d+"))
          -- stats report Redis's count as of the previous stats call
          wait_until("the key count in stats", function() return node.stats().idempotency_keys == 3 end)
        else
          local st = node.stats()
          assert.equals(3, st.idempotency_keys)
          assert.equals(2, st.idempotency_evicted)
          assert.is_true(st.idempotency_key_bytes > 0)
        end
        -- k5 is remembered, k1 is not: its retry publishes again
        local _, _, _, h5 = node.publish("m", '{"n":5}', "k5")
        assert.equals("true", h5["idempotent-replayed"])
        local _, _, _, h1 = node.publish("m", '{"n":1}', "k1")
        assert.is_nil(h1["idempotent-replayed"])
        assert.equals(6, #node.events("m"))
      end)
    end)

    it("manager:publish takes { idempotency_key = } and still a plain callback", function()
      with_nodes({}, 1, function(node)
        local m = node.manager
        local function publish(category, data, key)
          local done = async.event()
          local r, err, code = m:publish(category, data, { idempotency_key = key, callback = function(e, perr, pcode)
            done:set(e or false, perr, pcode)
          end })
          if not r then return nil, err, code end
          local e, perr, pcode = done:wait(5000)
          if not e then return nil, perr, pcode end
          return e
        end
        local first = assert(publish("lua", { n = 1 }, "lk"))
        assert.is_nil(first.replayed)
        local again = assert(publish("lua", { n = 1 }, "lk"))
        assert.is_true(again.replayed)
        assert.equals(first.id, again.id)
        assert.equals(first.timestamp, again.timestamp)
        local r, err, code = publish("lua", { n = 2 }, "lk")
        assert.is_nil(r)
        assert.equals("EKEYMISMATCH", code)
        assert.matches("different request", err)
        r, err = m:publish("lua", { n = 1 }, { idempotency_key = ("z"):rep(256) })
        assert.is_nil(r)
        assert.matches("1 to 255", err)
        r, err = m:publish("lua", { n = 1 }, { idempotency = "x" })
        assert.is_nil(r)
        assert.matches("unknown publish option 'idempotency'", err)
        r, err = m:publish("lua", { n = 1 }, 42)
        assert.is_nil(r)
        assert.matches("callback or a table", err)
        -- the old form: a function as the third argument
        local done = async.event()
        assert.truthy(m:publish("lua", { n = 3 }, function(e) done:set(e) end))
        local e = done:wait(5000)
        assert.equals(3, e.data.n)
        assert.equals(2, #node.events("lua"))
      end)
    end)

    it("answers 409 while the first request with the key is in flight", function()
      with_nodes({}, 1, function(node)
        local m = node.manager
        if not R then
          -- in memory a publish is stored before it returns: only a publish made while it is
          -- handed out (here by a watcher) can find its key in flight
          local inner
          assert(m:watch("f", function()
            inner = { m:publish("f", { n = 1 }, { idempotency_key = "fk" }) }
          end))
          assert(m:publish("f", { n = 1 }, { idempotency_key = "fk" }))
          assert.is_nil(inner[1])
          assert.equals("EKEYBUSY", inner[3])
          assert.equals(1, #node.events("f"))
          local _, _, _, h = node.publish("f", '{"n":1}', "fk")
          assert.equals("true", h["idempotent-replayed"])
          return
        end
        -- Redis: the publish script's answer is held, so the first request stays in flight
        node.transport.holding = true
        local result
        local first = async.spawn(function() result = { node.publish("f", '{"n":1}', "fk") } end)
        wait_until("first publish in flight", function() return #node.transport.held == 1 end)
        local status, _, body = node.publish("f", '{"n":1}', "fk")
        assert.equals(409, status)
        assert.matches("still being processed", body.error)
        assert.equals(1, node.manager:stats().idempotency_in_flight)
        node.transport.release()
        async.wait_all { first }
        assert.equals(200, result[1])
        local _, raw, _, h = node.publish("f", '{"n":1}', "fk")
        assert.equals(result[2], raw)
        assert.equals("true", h["idempotent-replayed"])
        assert.equals(1, #node.events("f"))
      end)
    end)

    if mode.name == "Redis" then
      it("recognises a retry on another node (the key lives in Redis)", function()
        with_nodes({}, 2, function(a, b)
          local _, raw = a.publish("x", '{"n":1}', "node-key")
          local status, raw_b, _, h = b.publish("x", '{"n":1}', "node-key")
          assert.equals(200, status)
          assert.equals(raw, raw_b)
          assert.equals("true", h["idempotent-replayed"])
          assert.equals(422, (b.publish("x", '{"n":2}', "node-key")))
          assert.equals(1, #a.events("x"))
          local ttl = tonumber(R:cli("PTTL longpoll:k:node-key"):match("%-?%d+"))
          assert.is_true(ttl > 0 and ttl <= 86400000)
        end)
      end)
    end
  end)
end

describe("the in-memory key table (idempotency.new_keys)", function()
  local idem = require "longpoll.idempotency"

  -- The reference: a plain list, oldest first, with the same rules.
  local function reference(max_keys, max_bytes, window_ms)
    local r = { list = {}, count = 0, bytes = 0, evicted = 0, replays = 0, conflicts = 0 }
    local function live_at(key)
      for i = #r.list, 1, -1 do
        local e = r.list[i]
        if e.key == key and e.live then return e end
      end
    end
    local function pop()
      local e = table.remove(r.list, 1)
      if e.live then
        e.live = false
        r.count, r.bytes = r.count - 1, r.bytes - e.cost
        return true
      end
    end
    function r.expire(now)
      while #r.list > 0 and (not r.list[1].live or r.list[1].exp <= now) do pop() end
    end
    function r.begin(key, fp, now)
      r.expire(now)
      local e = live_at(key)
      if e then
        if e.fp ~= fp then r.conflicts = r.conflicts + 1; return nil, "EKEYMISMATCH" end
        if not e.id then return nil, "EKEYBUSY" end
        r.replays = r.replays + 1
        return nil, "EREPLAY", { id = e.id, timestamp = e.ts }
      end
      local cost = #key + #fp + 36 + idem.RECORD_COST
      while (r.count + 1 > max_keys or r.bytes + cost > max_bytes) and #r.list > 0 do
        if pop() then r.evicted = r.evicted + 1 end
      end
      e = { key = key, fp = fp, exp = now + window_ms, cost = cost, live = true }
      r.list[#r.list + 1] = e
      r.count, r.bytes = r.count + 1, r.bytes + cost
      return e
    end
    function r.commit(e, id, ts) if e.live then e.id, e.ts = id, ts end end
    function r.abort(e)
      if e.live then
        e.live = false
        r.count, r.bytes = r.count - 1, r.bytes - e.cost
      end
    end
    return r
  end

  it("behaves as a plain list under random begins, commits, aborts, expiry and both bounds", function()
    for seed = 1, 10 do
      math.randomseed(seed)
      local max_keys, max_bytes = math.random(1, 50), math.random(300, 12000)
      local window = math.random(5, 200)
      local k = idem.new_keys { max_keys = max_keys, max_bytes = max_bytes, window_ms = window }
      local r = reference(max_keys, max_bytes, window)
      local now = 0
      for step = 1, 2000 do
        now = now + math.random(0, 3)
        local key = "k" .. math.random(1, 80) .. ("x"):rep(math.random(0, 3) * 40)
        local fp = math.random(1, 10) == 1 and "other" or "fp"
        local ticket, code, prior = k:begin(key, fp, now)
        local e, rcode, rprior = r.begin(key, fp, now)
        local where = ("seed %d step %d"):format(seed, step)
        assert.equals(rcode, code, where)
        assert.same(rprior, prior, where)
        if e then
          local roll = math.random(1, 10)
          if roll <= 8 then
            k:commit(ticket, key, "id" .. step, step)
            r.commit(e, "id" .. step, step)
          elseif roll == 9 then
            k:abort(ticket, key)
            r.abort(e)
          end -- else left in flight
        end
        local st = k:stats(now)
        r.expire(now)
        assert.equals(r.count, st.idempotency_keys, where)
        assert.equals(r.bytes, st.idempotency_key_bytes, where)
        assert.equals(r.evicted, st.idempotency_evicted, where)
        assert.equals(r.replays, st.idempotency_replays, where)
        assert.equals(r.conflicts, st.idempotency_conflicts, where)
        assert.is_true(st.idempotency_keys <= max_keys and st.idempotency_key_bytes <= math.max(max_bytes, 600), where)
      end
    end
  end)
end)
