-- bin/longpoll as a black box: flags, the contract over HTTP, graceful stop.
local async = require "support.async"
local process = require "support.process"
local cjson = require "cjson"

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
      "--buffer-size", "--ttl", "--delete-after-first", "--static", "--persist" } do
      assert.truthy(r.out:find(flag, 1, true), flag)
    end
  end)

  it("exits with status 2 on a bad flag", function()
    for _, args in ipairs {
      { "bin/longpoll", "serve", "--nope" },
      { "bin/longpoll", "serve", "--port" },
      { "bin/longpoll", "serve", "--port", "x" },
      { "bin/longpoll", "serve", "--ttl", "-1" },
      { "bin/longpoll", "serve", "--buffer-size", "0" },
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
end)
