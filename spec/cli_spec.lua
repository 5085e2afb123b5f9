-- bin/longpoll as a black box: flags, the contract over HTTP, graceful stop.
local async = require "support.async"
local process = require "support.process"
local cjson = require "cjson"
local cli = require "longpoll.cli"

local function publish(port, category, data_json, headers)
  local status, h, body = async.http(port, { method = "POST", path = "/publish", headers = headers,
    body = '{"category":' .. cjson.encode(category) .. ',"data":' .. data_json .. "}" })
  return status, body and body ~= "" and cjson.decode(body) or nil, h
end

local function stats_of(port)
  local status, _, body = async.http(port, { path = "/stats" })
  assert.equals(200, status)
  return cjson.decode(body)
end

local function run_cli(args)
  local out
  async.run(function()
    local child = process.start(args, { wait_port = false })
    local code = child:wait(5000)
    out = { code = code, out = child.out, err = child.err }
  end)
  return out
end

describe("bin/longpoll", function()
  it("documents every flag in --help", function()
    local r = run_cli { "bin/longpoll", "serve", "--help" }
    assert.equals(0, r.code)
    for _, flag in ipairs { "--host", "--port", "--subscribe-path", "--publish-path", "--max-timeout",
      "--buffer-size", "--ttl", "--delete-after-first", "--static", "--persist", "--max-memory",
      "--max-categories", "--max-body-bytes", "--publish-token", "LONGPOLL_PUBLISH_TOKEN" } do
      assert.truthy(r.out:find(flag, 1, true), flag)
    end
    -- and the defaults of the safety flags
    assert.truthy(r.out:find("default 512M, or a quarter of the RAM", 1, true))
    assert.truthy(r.out:find("default 2097152", 1, true))
  end)

  it("reads sizes with K, M and G suffixes and has a bounded default memory cap", function()
    assert.equals(512 * 1024 * 1024, cli.parse_size("512M"))
    assert.equals(64 * 1024, cli.parse_size("64k"))
    assert.equals(2 * 1024 ^ 3, cli.parse_size("2GiB"))
    assert.equals(1000, cli.parse_size("1000"))
    assert.equals(0, cli.parse_size("0"))
    for _, bad in ipairs { "", "M", "1.5G", "-1M", "12X", "99999999999999999999G" } do
      assert.is_nil(cli.parse_size(bad), bad)
    end
    local d = cli.default_max_memory()
    assert.is_true(d > 0 and d <= 512 * 1024 * 1024)
    assert.is_true(d <= require("luv").get_total_memory() / 4 or d == 512 * 1024 * 1024)
  end)

  it("exits with status 2 on a bad flag", function()
    for _, args in ipairs {
      { "bin/longpoll", "serve", "--nope" },
      { "bin/longpoll", "serve", "--port" },
      { "bin/longpoll", "serve", "--port", "x" },
      { "bin/longpoll", "serve", "--ttl", "-1" },
      { "bin/longpoll", "serve", "--buffer-size", "0" },
      { "bin/longpoll", "serve", "--max-memory", "lots" },
      { "bin/longpoll", "serve", "--publish-token", "short" },
      { "bin/longpoll", "serve", "--max-memory", "1M", "--redis", "redis://127.0.0.1:1" },
      { "bin/longpoll", "bogus" },
    } do
      local r = run_cli(args)
      assert.equals(2, r.code, table.concat(args, " "))
      assert.matches("longpoll: ", r.err)
    end
  end)

  it("serves the contract and stops gracefully on SIGTERM", function()
    async.run(function()
      local child = process.start { "bin/longpoll", "serve", "--port", "0", "--buffer-size", "5", "--max-timeout", "30" }
      local port = child.port
      local waiting = async.spawn(function()
        local status, _, body = async.http(port, { path = "/events?category=x&timeout=30" })
        assert.equals(200, status)
        assert.equals("no events before timeout", cjson.decode(body).timeout)
      end)
      local status, _, body = async.http(port, { method = "POST", path = "/publish", body = '{"category":"n","data":[1]}' })
      assert.equals(200, status)
      assert.same({ success = true }, cjson.decode(body))
      local _, _, got = async.http(port, { path = "/events?category=n&timeout=1&since_time=0" })
      assert.same({ 1 }, cjson.decode(got).events[1].data)
      local _, _, err = async.http(port, { path = "/events?category=n&timeout=31" })
      assert.equals("Invalid or missing 'timeout' arg.  Must be 1-30.", cjson.decode(err).error)
      local _, h = async.http(port, { path = "/js/longpoll.js" })
      assert.truthy(h)
      async.sleep(100)
      local code, signal = child:stop("sigterm")
      async.wait_all { waiting }
      assert.equals(0, code)
      assert.equals(0, signal)
    end, 15000)
  end)

  it("keeps events across a restart with --persist", function()
    local file = os.tmpname()
    os.remove(file)
    async.run(function()
      local args = { "bin/longpoll", "serve", "--port", "0", "--persist", file, "--flush-ms", "50" }
      local first = process.start(args)
      local status = async.http(first.port, { method = "POST", path = "/publish", body = '{"category":"p","data":12345678901234567890}' })
      assert.equals(200, status)
      local _, _, before = async.http(first.port, { path = "/events?category=p&timeout=1&since_time=0" })
      assert.equals(0, (first:stop("sigterm")))
      local second = process.start(args)
      local _, _, after = async.http(second.port, { path = "/events?category=p&timeout=1&since_time=0" })
      assert.equals(before, after) -- same id, timestamp and digits
      assert.truthy(after:find("12345678901234567890", 1, true))
      assert.equals(0, (second:stop("sigterm")))
    end, 15000)
    os.remove(file)
  end)

  it("listens on IPv6", function()
    async.run(function()
      local child = process.start { "bin/longpoll", "serve", "--host", "::1", "--port", "0" }
      local status = async.http(child.port, { host = "::1", path = "/events?category=a&timeout=1&since_time=0" })
      assert.equals(200, status)
      assert.equals(0, (child:stop("sigint")))
    end)
  end)

  it("--max-memory bounds the buffers: a flood of new categories evicts the oldest, counted", function()
    async.run(function()
      local child = process.start { "bin/longpoll", "serve", "--port", "0", "--max-memory", "256K" }
      local conn = async.connect(child.port)
      local pad = ('"' .. ("p"):rep(200) .. '"')
      for i = 1, 2000 do -- ~330 B of JSON and ~720 B with bookkeeping each: about 2.7x the cap
        local body = '{"category":"flood-' .. i .. '","data":' .. pad .. "}"
        conn:send("POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: " .. #body .. "\r\n\r\n" .. body)
        local status = conn:read_response()
        assert.equals(200, status)
      end
      conn:close()
      local s = stats_of(child.port)
      assert.equals(2000, s.published)
      assert.is_true(s.buffered_bytes <= 256 * 1024, "buffered_bytes " .. s.buffered_bytes)
      assert.is_true(s.evicted > 1000, "evicted " .. s.evicted)
      assert.equals(s.published - s.events, s.evicted)
      -- the newest event is still there
      local _, _, got = async.http(child.port, { path = "/events?category=flood-2000&timeout=1&since_time=0" })
      assert.equals(1, #cjson.decode(got).events)
      assert.equals(0, (child:stop("sigterm")))
    end, 60000)
  end)

  it("--max-categories refuses a new category with 503", function()
    async.run(function()
      local child = process.start { "bin/longpoll", "serve", "--port", "0", "--max-categories", "2" }
      assert.equals(200, (publish(child.port, "a", "1")))
      assert.equals(200, (publish(child.port, "b", "1")))
      local status, body = publish(child.port, "c", "1")
      assert.equals(503, status)
      assert.equals("too many categories (max_categories)", body.error)
      assert.equals(200, (publish(child.port, "a", "2")))
      assert.equals(0, (child:stop("sigterm")))
    end, 15000)
  end)

  it("admits a 1.5 MiB event by default; --max-body-bytes sets the limit", function()
    async.run(function()
      local big = '"' .. ("0123456789abcdef"):rep(98304) .. '"' -- 1.5 MiB of data
      local child = process.start { "bin/longpoll", "serve", "--port", "0" }
      assert.equals(200, (publish(child.port, "big", big)))
      local _, _, got = async.http(child.port, { path = "/events?category=big&timeout=1&since_time=0" })
      assert.equals(#big - 2, #cjson.decode(got).events[1].data)
      assert.equals(0, (child:stop("sigterm")))
      local small = process.start { "bin/longpoll", "serve", "--port", "0", "--max-body-bytes", "1000" }
      assert.equals(200, (publish(small.port, "s", '"' .. ("x"):rep(900) .. '"')))
      assert.equals(413, (publish(small.port, "s", '"' .. ("x"):rep(1000) .. '"')))
      assert.equals(0, (small:stop("sigterm")))
    end, 30000)
  end)

  it("lists categories in /stats only with --stats-categories", function()
    async.run(function()
      local closed = process.start { "bin/longpoll", "serve", "--port", "0" }
      assert.equals(200, (publish(closed.port, "room-secret", "1")))
      local status, _, body = async.http(closed.port, { path = "/stats?categories=1" })
      assert.equals(403, status)
      assert.is_nil(body:find("room-secret", 1, true))
      assert.equals(0, (closed:stop("sigterm")))
      local open = process.start { "bin/longpoll", "serve", "--port", "0", "--stats-categories" }
      assert.equals(200, (publish(open.port, "room-secret", "1")))
      local ostatus, _, obody = async.http(open.port, { path = "/stats?categories=1" })
      assert.equals(200, ostatus)
      assert.equals(1, cjson.decode(obody).by_category["room-secret"].events)
      assert.equals(0, (open:stop("sigterm")))
    end, 15000)
  end)

  it("reads publish keys written with escapes as any JSON parser does", function()
    async.run(function()
      local child = process.start { "bin/longpoll", "serve", "--port", "0" }
      local status = async.http(child.port, { method = "POST", path = "/publish",
        body = '{"\\u0063ategory":"esc","d\\u0061ta":[1],"category\\u0000":"other"}' })
      assert.equals(200, status)
      local _, _, got = async.http(child.port, { path = "/events?category=esc&timeout=1&since_time=0" })
      assert.same({ 1 }, cjson.decode(got).events[1].data)
      assert.equals(0, (child:stop("sigterm")))
    end, 15000)
  end)

  describe("--publish-token", function()
    local TOKEN = "s3cret-token-0123456789"

    it("refuses publishes without the bearer token (401), subscribers are unaffected", function()
      async.run(function()
        local child = process.start { "bin/longpoll", "serve", "--port", "0", "--publish-token", TOKEN }
        local status, body, h = publish(child.port, "c", "1")
        assert.equals(401, status)
        assert.matches("Authorization: Bearer", body.error)
        assert.equals('Bearer realm="longpoll"', h["www-authenticate"])
        assert.equals(401, (publish(child.port, "c", "1", { Authorization = "Bearer wrong-token-0123456789" })))
        assert.equals(401, (publish(child.port, "c", "1", { Authorization = "Basic " .. TOKEN })))
        assert.equals(401, (publish(child.port, "c", "1", { Authorization = "Bearer " .. TOKEN .. "x" })))
        assert.equals(200, (publish(child.port, "c", "1", { Authorization = "Bearer " .. TOKEN })))
        assert.equals(200, (publish(child.port, "c", "2", { Authorization = "bearer " .. TOKEN })))
        local status2, _, got = async.http(child.port, { path = "/events?category=c&timeout=1&since_time=0" })
        assert.equals(200, status2)
        assert.equals(2, #cjson.decode(got).events)
        assert.equals(0, (child:stop("sigterm")))
        assert.is_nil(child.err:find("open publishing", 1, true))
      end, 15000)
    end)

    it("is read from LONGPOLL_PUBLISH_TOKEN and applies to cross-origin publishes", function()
      async.run(function()
        local child = process.start({ "bin/longpoll", "serve", "--port", "0", "--cors", "*" },
          { env = { "LONGPOLL_PUBLISH_TOKEN=" .. TOKEN } })
        local origin = { Origin = "https://elsewhere.example" }
        local status, _, h = publish(child.port, "c", "1", origin)
        assert.equals(401, status)
        assert.equals("*", h["access-control-allow-origin"]) -- so the page can read the refusal
        -- the preflight lets a browser send the header
        local pstatus, ph = async.http(child.port, { method = "OPTIONS", path = "/publish", headers = {
          Origin = "https://elsewhere.example", ["Access-Control-Request-Method"] = "POST",
          ["Access-Control-Request-Headers"] = "authorization, content-type" } })
        assert.equals(204, pstatus)
        assert.matches("Authorization", ph["access-control-allow-headers"])
        assert.equals(200, (publish(child.port, "c", "1",
          { Origin = "https://elsewhere.example", Authorization = "Bearer " .. TOKEN })))
        assert.equals(0, (child:stop("sigterm")))
      end, 15000)
    end)

    it("serve warns at start when it listens beyond loopback with open publishing", function()
      async.run(function()
        local open = process.start { "bin/longpoll", "serve", "--host", "0.0.0.0", "--port", "0" }
        assert.equals(0, (open:stop("sigterm")))
        assert.matches("warning: listening on 0%.0%.0%.0 with open publishing", open.err)
        local closed = process.start { "bin/longpoll", "serve", "--host", "0.0.0.0", "--port", "0",
          "--publish-token", TOKEN }
        assert.equals(0, (closed:stop("sigterm")))
        assert.is_nil(closed.err:find("warning", 1, true))
        local loopback = process.start { "bin/longpoll", "serve", "--port", "0" }
        assert.equals(0, (loopback:stop("sigterm")))
        assert.is_nil(loopback.err:find("warning", 1, true))
      end, 15000)
    end)
  end)

  describe("--persist", function()
    local dir
    before_each(function() dir = assert(require("luv").fs_mkdtemp("/tmp/longpoll-cli-spec-XXXXXX")) end)
    after_each(function()
      os.execute("umount '" .. dir .. "/mnt' 2>/dev/null; rm -rf '" .. dir .. "'")
    end)

    it("refuses a second server on the same file with a clear message", function()
      async.run(function()
        local file = dir .. "/events.log"
        local first = process.start { "bin/longpoll", "serve", "--port", "0", "--persist", file }
        local second = process.start({ "bin/longpoll", "serve", "--port", "0", "--persist", file },
          { wait_port = false })
        assert.equals(2, (second:wait(15000)))
        assert.matches("in use by another process", second.err)
        assert.equals(200, (publish(first.port, "c", "1")))
        assert.equals(0, (first:stop("sigterm")))
        local third = process.start { "bin/longpoll", "serve", "--port", "0", "--persist", file }
        local _, _, got = async.http(third.port, { path = "/events?category=c&timeout=1&since_time=0" })
        assert.equals(1, #cjson.decode(got).events)
        assert.equals(0, (third:stop("sigterm")))
      end, 30000)
    end)

    it("on a full disk: publishes get 503 instead of a silent loss, and a restart works", function()
      local mnt = dir .. "/mnt"
      os.execute("mkdir '" .. mnt .. "'")
      if not os.execute("mount -t tmpfs -o size=64k tmpfs '" .. mnt .. "' 2>/dev/null") then
        return pending("cannot mount a tmpfs here (needs root): full-disk spec skipped")
      end
      async.run(function()
        local args = { "bin/longpoll", "serve", "--port", "0", "--persist", mnt .. "/events.log", "--flush-ms", "5" }
        local child = process.start(args)
        local pad = '"' .. ("p"):rep(2000) .. '"'
        local accepted, refused = 0, nil
        for _ = 1, 200 do -- 64 KiB fill up within about 30 events
          local status, body = publish(child.port, "c", pad)
          if status == 503 then
            refused = body.error
            break
          end
          assert.equals(200, status)
          accepted = accepted + 1
          async.sleep(10) -- let each batch reach the disk: the failure shows on the next publish
        end
        assert.matches("persistence is failing", refused or "never refused")
        assert.equals(0, (child:stop("sigterm")))
        assert.matches("write failed", child.err)
        -- the disk is still full; the server starts and serves what reached the disk
        local again = process.start(args)
        local _, _, got = async.http(again.port, { path = "/events?category=c&timeout=1&since_time=0" })
        local n = #cjson.decode(got).events
        assert.is_true(n > 0 and n <= accepted, ("restored %d of %d accepted"):format(n, accepted))
        assert.equals(0, (again:stop("sigterm")))
      end, 60000)
    end)
  end)
end)
