-- The Redis engine on setups without a single point of failure, with real processes on
-- 127.0.0.1: a master, a replica and three sentinels (the master SIGKILLed mid-run), and three
-- independent masters as shards (one of them killed). Two engines ("nodes") in this process;
-- publishers retry what was refused, subscribers hop between the nodes on every request and
-- continue from their cursor as golongpoll's client does. The checker then proves that every
-- acknowledged event reached every subscriber of its category exactly once, in order.
local uv = require "luv"
local async = require "support.async"
local redis = require "support.redis"
local engines = require "support.redis_engines"
local cjson = require "cjson"

local wait_until = async.wait_or_fail

if not (redis.available() and redis.sentinel_available()) then
  describe("Redis failover", function() pending("redis-server or redis-sentinel is not installed") end)
  return
end

-- The time now (uv.now() alone is the loop's cached time, stale after a blocking call).
local function now()
  uv.update_time()
  return uv.now()
end

local function say(fmt, ...) io.stderr:write(fmt:format(...), "\n") end

local function new_node(redis_option)
  return engines.start(redis_option, { max_event_buffer_size = 100000 })
end

local close_node, publish = engines.close, engines.publish

-- One long poll as the manager runs it: events, or, when its time is up, engine:expire's answer.
-- Returns "events", body | "timeout", ts | nil, message (refused).
local function poll(node, sub, timeout_ms)
  local result = async.event()
  local handle, err = node.engine:subscribe(sub, function(body) result:set("events", body) end)
  if not handle then return nil, err end
  if not result:wait(timeout_ms) then
    node.engine:expire(handle, function(ts) result:set("timeout", ts) end)
  end
  local kind, x = result:wait(10000)
  assert(kind, "expire never answered")
  return kind, x
end

-- A subscriber of one category hopping between nodes until stop() says so; got lists the
-- events it received, in order.
local function subscriber(nodes, category, stop)
  local s = { category = category, got = {}, since = 0, last_id = nil, requests = 0 }
  s.task = async.spawn(function()
    while not stop(s) do
      s.requests = s.requests + 1
      local node = nodes[s.requests % #nodes + 1]
      local kind, x = poll(node, { categories = { category }, since = s.since, last_id = s.last_id }, 300)
      if kind == "events" then
        for _, e in ipairs(cjson.decode(x).events) do s.got[#s.got + 1] = e end
        local last = s.got[#s.got]
        s.since, s.last_id = math.tointeger(last.timestamp), last.id -- cjson reads numbers as floats
      elseif kind == "timeout" then
        if x then s.since = x end
      else
        async.sleep(30) -- refused (Redis away): try again
      end
    end
  end)
  return s
end

-- Checks a subscriber against the acknowledged events of its category (in acknowledgement order
-- per publisher): each exactly once, timestamps never going back, each publisher's in order.
local function check(s, acked)
  local seen, last_ts, last_n = {}, -1, {}
  for _, e in ipairs(s.got) do
    assert(not seen[e.id], ("%s: event %s twice"):format(s.category, e.id))
    seen[e.id] = true
    assert(e.timestamp >= last_ts, ("%s: timestamps went back"):format(s.category))
    last_ts = e.timestamp
    local p, n = e.data.p, e.data.n
    assert((last_n[p] or 0) <= n, ("%s: publisher %s out of order"):format(s.category, tostring(p)))
    last_n[p] = n
  end
  local missing = 0
  for _, e in ipairs(acked) do
    if e.category == s.category and not seen[e.id] then missing = missing + 1 end
  end
  return missing
end

---------------------------------------------------------------------------------------------
-- Sentinel

-- master + 1 replica + 3 sentinels; SIGKILL of the master after a third of the publishes, and
-- the killed master restarted (by "a supervisor") once the sentinels promoted the replica, so
-- it rejoins as a replica. Returns the figures of the run.
local function sentinel_run(wait_replicas)
  local master = redis.start()
  local replica = redis.start { replica_of = master.port }
  local sentinels, addresses = {}, {}
  local result
  local ok, err = pcall(function()
    wait_until = async.wait_or_fail
    for i = 1, 3 do
      sentinels[i] = redis.start { sentinel_of = master.port }
      addresses[i] = "127.0.0.1:" .. sentinels[i].port
    end
    async.run(function()
      wait_until("the replica to sync", function() return replica:cli("INFO replication"):find("master_link_status:up") end)
      wait_until("the sentinels to see each other and the replica", function()
        local info = sentinels[1]:cli("SENTINEL MASTER mymaster")
        return info:find("num%-other%-sentinels\n2") and info:find("num%-slaves\n1")
      end, 10000)
      local option = { sentinels = addresses, master_name = "mymaster", wait_replicas = wait_replicas,
        wait_timeout_ms = 500 }
      local nodes = { new_node(option), new_node(option) }
      wait_until("nodes online", function()
        return nodes[1].engine:stats().redis.online and nodes[2].engine:stats().redis.online
      end)
      local categories, per_publisher = { "a", "b" }, 60
      local acked, refused, publishing = {}, 0, 0
      local killed_at, dead_at, back_at
      local subs = {}
      local function stop(s)
        if not s.stop_deadline then return false end -- publishers still at work
        return check(s, acked) == 0 or now() > s.stop_deadline
      end
      for _, c in ipairs(categories) do
        for _ = 1, 2 do
          local s = subscriber(nodes, c, function(s) return stop(s) end)
          subs[#subs + 1] = s
        end
      end
      local publishers = {}
      for p = 1, 4 do
        local category = categories[(p - 1) % #categories + 1]
        publishing = publishing + 1
        publishers[p] = async.spawn(function()
          for n = 1, per_publisher do
            while true do
              local node = nodes[(n + p) % 2 + 1]
              local started = now()
              local e = publish(node, category, cjson.encode({ p = p, n = n }))
              if e then
                acked[#acked + 1] = e
                if dead_at and started >= dead_at and not back_at then
                  back_at = now()
                end
                break
              end
              refused = refused + 1
              async.sleep(25) -- retry, as a publisher getting 503 does
            end
            async.sleep(15)
            if p == 1 and n == per_publisher // 3 and not killed_at then
              killed_at = now()
              master:kill()
              dead_at = now() -- what is acknowledged from now on came from the new master
            end
          end
          publishing = publishing - 1
          if publishing == 0 then
            local deadline = now() + 10000
            for _, s in ipairs(subs) do s.stop_deadline = deadline end
          end
        end)
      end
      -- the supervisor: once a sentinel names the new master, the old one comes back, empty, as a
      -- replica of the new master (with one replica, wait_replicas = 1 needs it)
      wait_until("the sentinels to promote the replica", function()
        return killed_at and sentinels[1]:cli("SENTINEL get-master-addr-by-name mymaster"):find(tostring(replica.port))
          and not sentinels[1]:failover_in_progress()
      end, 15000)
      local promoted_at = now()
      master.replica_of = replica.port
      master:start()
      async.wait_all(publishers)
      async.wait_all((function()
        local t = {}
        for i, s in ipairs(subs) do t[i] = s.task end
        return t
      end)())
      local missing = 0
      for _, s in ipairs(subs) do missing = missing + check(s, acked) end
      -- what the new master holds of the acknowledged events
      local held = 0
      for _, c in ipairs(categories) do
        local kind, body = poll(nodes[1], { categories = { c }, since = 0 }, 2000)
        if kind == "events" then
          local ids = {}
          for _, e in ipairs(cjson.decode(body).events) do ids[e.id] = true end
          for _, e in ipairs(acked) do if e.category == c and ids[e.id] then held = held + 1 end end
        end
      end
      result = { acked = #acked, refused = refused, missing = missing, held = held,
        promoted_ms = promoted_at - killed_at, back_ms = back_at and back_at - killed_at,
        switches = nodes[1].engine:stats().redis.switches }
      for _, node in ipairs(nodes) do close_node(node) end
    end, 60000)
  end)
  for _, s in ipairs(sentinels) do s:stop() end
  replica:stop()
  master:stop()
  if not ok then error(err, 0) end
  return result
end

describe("Redis with Sentinel", function()
  it("loses no acknowledged event when the master is killed, with wait_replicas = 1", function()
    local r = sentinel_run(1)
    say("sentinel, wait_replicas=1: %d acknowledged, %d refused (retried), promoted %d ms and publishing"
      .. " again %d ms after the kill; acknowledged events lost by the failover: %d, missed by subscribers: %d",
      r.acked, r.refused, r.promoted_ms, r.back_ms or -1, r.acked - r.held, r.missing)
    assert.equals(4 * 60, r.acked)
    assert.equals(r.acked, r.held) -- the new master has every acknowledged event
    assert.equals(0, r.missing) -- and every subscriber got each once, in order
    assert.truthy(r.back_ms and r.back_ms < 15000, "service not back within 15 s")
    assert.truthy(r.switches >= 1) -- the node followed +switch-master
  end)

  it("measures what a failover loses without wait_replicas", function()
    local r = sentinel_run(0)
    say("sentinel, wait_replicas=0: %d acknowledged, %d refused (retried), promoted %d ms and publishing"
      .. " again %d ms after the kill; acknowledged events lost by the failover: %d",
      r.acked, r.refused, r.promoted_ms, r.back_ms or -1, r.acked - r.held)
    assert.equals(4 * 60, r.acked)
    assert.truthy(r.back_ms and r.back_ms < 15000, "service not back within 15 s")
    -- subscribers: whatever survived reached them once, in order (the checker's asserts)
    assert.truthy(r.held <= r.acked)
  end)
end)

---------------------------------------------------------------------------------------------
-- Shards

describe("Redis shards", function()
  it("spreads 100 categories over 3 masters; a killed master stops only its categories", function()
    local masters = { redis.start(), redis.start(), redis.start() }
    local ok, err = pcall(async.run, function()
      local urls = {}
      for i, m in ipairs(masters) do urls[i] = m.url end
      local nodes = { new_node({ shards = urls }), new_node({ shards = urls }) }
      wait_until("nodes online", function()
        return nodes[1].engine:stats().redis_online and nodes[2].engine:stats().redis_online
      end)
      local shard_index = require("longpoll.engine.redis").shard_index
      local categories, on = {}, { 0, 0, 0 }
      for i = 1, 100 do
        categories[i] = "cat" .. i
        local k = shard_index(categories[i], 3)
        on[k] = on[k] + 1
      end
      for k = 1, 3 do assert.truthy(on[k] > 10, "categories are spread over the shards") end
      -- a subscription across shards is refused with a clear message; one hash tag keeps them together
      local a, b
      for i = 2, 100 do
        if shard_index(categories[i], 3) ~= shard_index(categories[1], 3) then
          a, b = categories[1], categories[i]
          break
        end
      end
      local h, msg, code = nodes[1].engine:subscribe({ categories = { a, b } }, function() end)
      assert.is_nil(h)
      assert.equals("EINVAL", code)
      assert.matches("live on different Redis shards", msg)
      assert.equals(shard_index("{room}.x", 3), shard_index("{room}.y", 3))
      h = assert(nodes[1].engine:subscribe({ categories = { "{room}.x", "{room}.y" } }, function() end))
      nodes[1].engine:cancel(h)
      -- 3 events per category, published on alternating nodes, read by subscribers hopping nodes
      local acked, done = {}, false
      local subs = {}
      for i, c in ipairs(categories) do
        subs[i] = subscriber(nodes, c, function(s) return done and check(s, acked) == 0 end)
      end
      for n = 1, 3 do
        for i, c in ipairs(categories) do
          acked[#acked + 1] = assert(publish(nodes[(i + n) % 2 + 1], c, cjson.encode({ p = 1, n = n })))
        end
      end
      done = true
      local tasks = {}
      for i, s in ipairs(subs) do tasks[i] = s.task end
      async.wait_all(tasks)
      for _, s in ipairs(subs) do assert.equals(0, check(s, acked)) end
      -- shard 2 dies: its categories refuse, the others keep serving
      masters[2]:kill()
      wait_until("the nodes to notice", function()
        local r = nodes[1].engine:stats().redis
        return not r[2].online and not nodes[2].engine:stats().redis[2].online
      end)
      local served, refused = 0, 0
      for i, c in ipairs(categories) do
        local e = publish(nodes[i % 2 + 1], c, "4")
        if shard_index(c, 3) == 2 then
          assert.is_nil(e)
          refused = refused + 1
        else
          assert.truthy(e, c)
          served = served + 1
        end
      end
      assert.equals(on[2], refused)
      assert.equals(100 - on[2], served)
      for _, node in ipairs(nodes) do close_node(node) end
    end, 60000)
    for _, m in ipairs(masters) do m:stop() end
    if not ok then error(err, 0) end
  end)
end)
