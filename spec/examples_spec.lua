-- Every example is started as its own process, used over HTTP, and stopped.
local async = require "support.async"
local process = require "support.process"
local cjson = require "cjson"

local b64 = require("longpoll.http.util").base64_encode

local function with_example(file, fn)
  async.run(function()
    local child = process.start({ file }, { env = { "PORT=0" } })
    local ok, err = pcall(fn, child.port)
    child:stop("sigterm")
    if not ok then error(err, 0) end
  end, 15000)
end

describe("examples", function()
  it("basic.lua serves subscribe and publish", function()
    with_example("examples/basic.lua", function(port)
      local status = async.http(port, { method = "POST", path = "/publish", body = '{"category":"news","data":"hello"}' })
      assert.equals(200, status)
      local _, _, body = async.http(port, { path = "/events?category=news&timeout=1&since_time=0" })
      assert.equals("hello", cjson.decode(body).events[1].data)
    end)
  end)

  it("authentication.lua wraps the handlers with basic auth, a token and a category list", function()
    with_example("examples/authentication.lua", function(port)
      local path = "/events?category=public&timeout=1"
      local status, h, body = async.http(port, { path = path })
      assert.equals(401, status)
      assert.matches('^Basic realm="longpoll"', h["www-authenticate"])
      assert.equals("authentication required", cjson.decode(body).error)
      status = async.http(port, { path = path, headers = { Authorization = "Basic " .. b64("alice:wrong") } })
      assert.equals(401, status)
      local _, _, ok_body = async.http(port, { path = path, headers = { Authorization = "Basic " .. b64("alice:wonderland") } })
      assert.equals("no events before timeout", cjson.decode(ok_body).timeout)

      local publish = function(headers, request_body)
        local s, _, b = async.http(port, { method = "POST", path = "/publish", headers = headers, body = request_body })
        return s, cjson.decode(b)
      end
      assert.equals(403, (publish({}, '{"category":"public","data":1}')))
      assert.equals(403, (publish({ ["X-Token"] = "wrong" }, '{"category":"public","data":1}')))
      local s, b = publish({ ["X-Token"] = "s3cret" }, '{"category":"secret","data":1}')
      assert.equals(403, s)
      assert.matches("not allowed", b.error)
      assert.equals(400, (publish({ ["X-Token"] = "s3cret" }, "not json")))
      assert.equals(200, (publish({ ["X-Token"] = "s3cret" }, '{"category":"public","data":1}')))
    end)
  end)

  it("router.lua mounts the handlers inside its own routes", function()
    with_example("examples/router.lua", function(port)
      assert.equals(200, (async.http(port, { path = "/" })))
      local status, _, posted = async.http(port, { method = "POST", path = "/api/v1/rooms/lobby/messages", body = "hi all" })
      assert.equals(200, status)
      local id = cjson.decode(posted).id
      local _, _, got = async.http(port, { path = "/api/v1/rooms/lobby/events?timeout=1&since_time=0" })
      local event = cjson.decode(got).events[1]
      assert.equals(id, event.id)
      assert.equals("room:lobby", event.category)
      assert.same({ text = "hi all" }, event.data)
      assert.equals(404, (async.http(port, { path = "/nowhere" })))
      assert.equals(405, (async.http(port, { method = "POST", path = "/api/v1/rooms/lobby/events" })))
    end)
  end)
end)
