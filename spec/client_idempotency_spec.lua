-- The Lua client's publish sends an Idempotency-Key and retries with it on a 503 or a network
-- error (issue 17, part 1): real servers on real sockets, the event stored once.
local uv = require "luv"
local async = require "support.async"
local fixture = require "support.fixture"
local client = require "longpoll.client"
local core = require "longpoll.core"

local function publish(c, category, data)
  local done = async.event()
  c:publish(category, data, function(ok, err) done:set(ok, err) end)
  return done:wait(10000)
end

local function new_client(port, options)
  local o = { publish_url = "http://127.0.0.1:" .. port .. "/publish", category = "news" }
  for k, v in pairs(options or {}) do o[k] = v end
  return assert(client.new(o))
end

describe("longpoll.client publish with an Idempotency-Key", function()
  it("sends a fresh key per publish and the same key on a retry after a 503", function()
    local keys = {}
    local answers_503 = 1
    fixture.with_server({}, function(t)
      local c = new_client(t.port)
      -- first publish: the server stores the event, then answers 503 (an answer that says
      -- nothing about the event, as a failing-over Redis could); the retry is a replay
      assert.same({ true }, { publish(c, "news", { n = 1 }) })
      assert.equals(2, #keys)
      assert.equals(keys[1], keys[2])
      assert.is_true(#keys[1] == 36 and core.is_uuid(keys[1]))
      -- second publish: a new key, answered at once
      assert.same({ true }, { publish(c, "news", { n = 2 }) })
      assert.equals(3, #keys)
      assert.are_not.equal(keys[1], keys[3])
      local events = t.manager:stats().events
      assert.equals(2, events) -- n = 1 stored once
      assert.equals(1, t.manager:stats().idempotency_replays)
      c:stop()
    end, {
      setup = function(manager, srv)
        srv:route("*", "/publish", function(req, res)
          keys[#keys + 1] = req.headers["idempotency-key"]
          if answers_503 > 0 then
            answers_503 = answers_503 - 1
            local category, data_json = core.parse_publish(req.body, 1024)
            assert(manager:publish_json(category, data_json, { idempotency_key = req.headers["idempotency-key"] }))
            res:set_header("Content-Type", "application/json")
            return res:send(503, '{"error":"try again"}')
          end
          return manager.publish_handler(req, res)
        end)
      end,
    })
  end)

  it("gives up after publish_retries and reports the last error", function()
    local tries = 0
    fixture.with_server({}, function(t)
      local c = new_client(t.port, { publish_retries = 2 })
      local ok, err = publish(c, "news", 1)
      assert.is_false(ok)
      assert.matches("HTTP response code: 503", err)
      assert.equals(3, tries)
      -- publish_retries = 0: one try only
      local c0 = new_client(t.port, { publish_retries = 0 })
      ok = publish(c0, "news", 1)
      assert.is_false(ok)
      assert.equals(4, tries)
      c:stop()
      c0:stop()
    end, {
      setup = function(_, srv)
        srv:route("*", "/publish", function(_, res)
          tries = tries + 1
          res:set_header("Content-Type", "application/json")
          return res:send(503, '{"error":"unavailable"}')
        end)
      end,
    })
    assert.is_nil(client.new { publish_url = "http://127.0.0.1:1/p", category = "x", publish_retries = 11 })
  end)

  it("retries with the same key when the connection is cut before the answer", function()
    async.run(function()
      -- a raw server: the first connection is closed after the request arrives, the second is
      -- answered
      local tcp = uv.new_tcp()
      assert(tcp:bind("127.0.0.1", 0))
      local port = tcp:getsockname().port
      local requests = {}
      tcp:listen(16, function()
        local conn = uv.new_tcp()
        tcp:accept(conn)
        local buf = ""
        conn:read_start(function(_, data)
          if not data then return conn:close() end
          buf = buf .. data
          local head_end = buf:find("\r\n\r\n", 1, true)
          if not head_end then return end
          local length = tonumber(buf:match("[Cc]ontent%-[Ll]ength: (%d+)"))
          if #buf < head_end + 3 + length then return end
          requests[#requests + 1] = buf:match("[Ii]dempotency%-[Kk]ey: ([^\r\n]+)")
          buf = ""
          if #requests == 1 then
            conn:read_stop()
            conn:close()
            return
          end
          local body = '{"success":true}'
          conn:write("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " .. #body .. "\r\n\r\n" .. body)
        end)
      end)
      local c = new_client(port)
      assert.same({ true }, { publish(c, "news", "hello") })
      assert.equals(2, #requests)
      assert.equals(requests[1], requests[2])
      c:stop()
      tcp:close()
    end, 15000)
  end)
end)
