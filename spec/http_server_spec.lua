-- The HTTP server over real sockets on 127.0.0.1 (and ::1): routing, framing, keep-alive,
-- pipelining, limits, timeouts, static files, streaming and shutdown.
local uv = require "luv"
local cjson = require "cjson"
local async = require "support.async"
local server = require "longpoll.server"

-- Starts a server, runs body(srv, port) and always closes the server again.
local function with_server(opts, setup, body, timeout_ms)
  async.run(function()
    local srv = assert(server.new(opts))
    setup(srv)
    local port = assert(srv:listen())
    local ok, err = pcall(body, srv, port)
    local closed = async.event()
    srv:close(function()
      closed:set()
    end)
    if not ok then
      error(err, 0)
    end
    assert(closed:wait(3000), "server did not finish closing")
  end, timeout_ms)
end

local function echo(req, res)
  res:send(200, {
    method = req.method,
    path = req.path,
    body = req.body,
    query = req.query,
  })
end

local function later(ms, fn)
  local t = uv.new_timer()
  t:start(ms, 0, function()
    t:close()
    fn()
  end)
end

local function json(body)
  return cjson.decode(body)
end

describe("http server", function()
  it("routes GET and POST and answers unknown paths with a JSON 404", function()
    with_server({}, function(srv)
      srv:route("GET", "/thing", echo)
      srv:route("POST", "/thing", function(req, res)
        res:send(201, "posted:" .. req.body)
      end)
    end, function(_, port)
      local status, headers, body = async.http(port, { path = "/thing?x=1" })
      assert.same(200, status)
      assert.same("application/json", headers["content-type"])
      assert.same({ method = "GET", path = "/thing", body = "", query = { x = "1" } }, json(body))
      status, headers, body = async.http(port, { method = "POST", path = "/thing", body = "abc" })
      assert.same(201, status)
      assert.same("posted:abc", body)
      assert.same("text/plain; charset=utf-8", headers["content-type"])
      status, headers, body = async.http(port, { path = "/nothing" })
      assert.same(404, status)
      assert.same("application/json", headers["content-type"])
      assert.same({ error = "not found" }, json(body))
    end)
  end)

  it("answers a known path with another method with 405 and Allow", function()
    with_server({}, function(srv)
      srv:route("GET", "/r", echo)
      srv:route("POST", "/r", echo)
      srv:route("*", "/any", echo)
    end, function(_, port)
      local status, headers, body = async.http(port, { method = "DELETE", path = "/r" })
      assert.same(405, status)
      assert.same("GET, HEAD, POST", headers.allow)
      assert.is_string(json(body).error)
      status, _, body = async.http(port, { method = "PATCH", path = "/any" })
      assert.same(200, status)
      assert.same("PATCH", json(body).method)
    end)
  end)

  it("answers HEAD like GET without a body", function()
    with_server({}, function(srv)
      srv:route("GET", "/h", function(_, res)
        res:set_header("X-Extra", "1")
        res:send(200, "twelve bytes")
      end)
    end, function(_, port)
      local conn = async.connect(port)
      conn:send("HEAD /h HTTP/1.1\r\n\r\nGET /h HTTP/1.1\r\n\r\n")
      local status, headers, body = conn:read_response{ head = true }
      assert.same(200, status)
      assert.same("12", headers["content-length"])
      assert.same("1", headers["x-extra"])
      assert.same("", body)
      -- Had the HEAD answer carried a body, this response would not parse.
      status, _, body = conn:read_response()
      assert.same(200, status)
      assert.same("twelve bytes", body)
      conn:close()
    end)
  end)

  it("reuses keep-alive connections and adds Date and Connection headers", function()
    local peers = {}
    with_server({}, function(srv)
      srv:route("GET", "/k", function(req, res)
        peers[#peers + 1] = req.remote_addr
        res:send(200, "k")
      end)
    end, function(srv, port)
      local conn = async.connect(port)
      for _ = 1, 3 do
        conn:send("GET /k HTTP/1.1\r\nHost: x\r\n\r\n")
        local status, headers = conn:read_response()
        assert.same(200, status)
        assert.matches("^%a%a%a, %d%d %a%a%a %d%d%d%d %d%d:%d%d:%d%d GMT$", headers.date)
        assert.is_nil(headers.connection) -- HTTP/1.1 keeps alive by default
      end
      assert.same(1, srv:connection_count())
      assert.is_false(conn:closed_by_peer(100))
      conn:close()
      assert.same(3, #peers)
      assert.matches("^127%.0%.0%.1:%d+$", peers[1])
      assert.same(peers[1], peers[3])
    end)
  end)

  it("answers pipelined requests strictly in order, even when the first answers later", function()
    local calls = {}
    with_server({}, function(srv)
      srv:route("GET", "/slow", function(_, res)
        calls[#calls + 1] = "slow"
        later(100, function()
          res:send(200, "slow")
        end)
      end)
      srv:route("GET", "/fast", function(req, res)
        calls[#calls + 1] = req.query.n
        res:send(200, req.query.n)
      end)
    end, function(_, port)
      local conn = async.connect(port)
      conn:send("GET /slow HTTP/1.1\r\n\r\nGET /fast?n=1 HTTP/1.1\r\n\r\nGET /fast?n=2 HTTP/1.1\r\n\r\n")
      async.sleep(50)
      assert.same({ "slow" }, calls) -- the next handlers wait for the pending answer
      for _, expected in ipairs{ "slow", "1", "2" } do
        local status, _, body = conn:read_response()
        assert.same(200, status)
        assert.same(expected, body)
      end
      conn:close()
    end)
  end)

  it("reads Content-Length and chunked bodies sent in pieces", function()
    with_server({}, function(srv)
      srv:route("POST", "/echo", echo)
    end, function(_, port)
      local conn = async.connect(port)
      conn:send("POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\n01234")
      async.sleep(20)
      conn:send("56789")
      local status, _, body = conn:read_response()
      assert.same(200, status)
      assert.same("0123456789", json(body).body)
      conn:send("POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc")
      async.sleep(20)
      conn:send("\r\n4;ext=1\r\ndefg\r\n0\r\n\r\n")
      status, _, body = conn:read_response()
      assert.same(200, status)
      assert.same("abcdefg", json(body).body)
      conn:close()
    end)
  end)

  it("sends 100 Continue before reading the body, and 413 instead when it is too large", function()
    with_server({ max_body_bytes = 100 }, function(srv)
      srv:route("POST", "/echo", echo)
    end, function(_, port)
      local conn = async.connect(port)
      conn:send("POST /echo HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
      local status = conn:read_response()
      assert.same(100, status)
      conn:send("hello")
      local body
      status, _, body = conn:read_response()
      assert.same(200, status)
      assert.same("hello", json(body).body)
      conn:close()
      local data = async.raw(port, "POST /echo HTTP/1.1\r\nContent-Length: 500\r\nExpect: 100-continue\r\n\r\n")
      assert.matches("^HTTP/1.1 413 ", data)
      assert.is_nil(data:find("100 Continue", 1, true))
    end)
  end)

  it("percent-decodes path and query and rejects invalid escapes", function()
    local seen
    with_server({}, function(srv)
      srv:route("GET", "/a b/ü", function(req, res)
        seen = { req.path, req.raw_path, req.query, req:query_all("k"), req:query_all("none"),
          req.query_count }
        res:send(200, "ok")
      end)
    end, function(_, port)
      local status = async.http(port, { path = "/a%20b/%C3%BC?k=1+2&k=%33&x=a%2Bb&flag" })
      assert.same(200, status)
      assert.same({ "/a b/ü", "/a%20b/%C3%BC", { k = "1 2", x = "a+b", flag = "" }, { "1 2", "3" }, {}, 4 },
        seen)
      local body
      status, _, body = async.http(port, { path = "/a%20b/%C3%BC?k=%zz" })
      assert.same(400, status)
      assert.is_string(json(body).error)
      assert.same(400, (async.http(port, { path = "/a%2xb" })))
      assert.same(400, (async.http(port, { path = "/a%2" })))
    end)
  end)

  it("matches header names case-insensitively and decodes Basic auth", function()
    local got
    with_server({}, function(srv)
      srv:route("GET", "/h", function(req, res)
        got = { req.headers["x-custom"], req.headers.accept, req:basic_auth() }
        res:send(200, "")
      end)
    end, function(_, port)
      local conn = async.connect(port)
      conn:send("GET /h HTTP/1.1\r\nX-CuStOm: v\r\naccept: a\r\nACCEPT: b\r\n"
        .. "Authorization: Basic dXNlcjpwYTpzcw==\r\n\r\n")
      assert.same(200, (conn:read_response()))
      conn:close()
      assert.same({ "v", "a, b", "user", "pa:ss" }, got)
    end)
  end)

  it("honours Connection: close and HTTP/1.0 keep-alive rules", function()
    with_server({}, function(srv)
      srv:route("GET", "/", function(_, res)
        res:send(200, "hi")
      end)
    end, function(_, port)
      local conn = async.connect(port)
      conn:send("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
      local status, headers = conn:read_response()
      assert.same(200, status)
      assert.same("close", headers.connection)
      assert.is_true(conn:closed_by_peer(1000))
      conn:close()

      local data, closed = async.raw(port, "GET / HTTP/1.0\r\n\r\n")
      assert.matches("^HTTP/1.1 200 OK\r\n", data)
      assert.matches("Connection: close\r\n", data)
      assert.matches("\r\n\r\nhi$", data)
      assert.is_true(closed)

      conn = async.connect(port)
      for _ = 1, 2 do
        conn:send("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers = conn:read_response()
        assert.same(200, status)
        assert.same("keep-alive", headers.connection)
      end
      assert.is_false(conn:closed_by_peer(100))
      conn:close()
    end)
  end)

  it("answers other HTTP versions with 505", function()
    with_server({}, function() end, function(_, port)
      local data, closed = async.raw(port, "GET / HTTP/2.0\r\n\r\n")
      assert.matches("^HTTP/1.1 505 ", data)
      assert.is_true(closed)
    end)
  end)

  it("enforces 431, 414 and 413 and closes", function()
    with_server({ max_header_bytes = 1024, max_url_bytes = 256, max_body_bytes = 64 }, function(srv)
      srv:route("POST", "/", echo)
    end, function(_, port)
      local data, closed = async.raw(port, "GET / HTTP/1.1\r\nX: " .. ("a"):rep(2000) .. "\r\n\r\n")
      assert.matches("^HTTP/1.1 431 ", data)
      assert.matches('{"error":"[^"]+"}$', data)
      assert.is_true(closed)
      data, closed = async.raw(port, "GET /" .. ("u"):rep(300) .. " HTTP/1.1\r\n\r\n")
      assert.matches("^HTTP/1.1 414 ", data)
      assert.is_true(closed)
      data, closed = async.raw(port, "POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n" .. ("b"):rep(65))
      assert.matches("^HTTP/1.1 413 ", data)
      assert.is_true(closed)
      data, closed = async.raw(port, "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        .. "41\r\n" .. ("b"):rep(65) .. "\r\n0\r\n\r\n")
      assert.matches("^HTTP/1.1 413 ", data)
      assert.is_true(closed)
      -- A client still uploading when the 413 goes out must get to read it (no RST).
      local conn = async.connect(port)
      conn:send("POST / HTTP/1.1\r\nContent-Length: 64\r\n\r\n" .. ("b"):rep(64)
        .. "POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n")
      conn:send(("c"):rep(4 * 1024 * 1024))
      assert.same(200, (conn:read_response()))
      assert.same(413, (conn:read_response()))
      assert.is_nil(conn.err)
      conn:close()
      -- Exactly at the limit is fine.
      local status, _, body = async.http(port, { method = "POST", path = "/", body = ("b"):rep(64) })
      assert.same(200, status)
      assert.same(64, #json(body).body)
    end)
  end)

  it("answers 408 when the head does not arrive in time and closes idle connections", function()
    -- deadlines with wide margins: each bound below is checked from a time taken before the
    -- server could have started its timer, so a slow machine cannot make them fail
    with_server({ header_timeout_ms = 200, keepalive_timeout_ms = 1000 }, function(srv)
      srv:route("GET", "/", function(_, res)
        res:send(200, "ok")
      end)
    end, function(srv, port)
      local t0 = uv.now()
      local data, closed = async.raw(port, "GET / HTTP/1.1\r\nHost: x\r\n", { timeout_ms = 2000 })
      assert.matches("^HTTP/1.1 408 ", data)
      assert.is_true(closed)
      assert.is_true(uv.now() - t0 >= 190)

      local conn = async.connect(port)
      t0 = uv.now()
      conn:send("GET / HTTP/1.1\r\n\r\n")
      assert.same(200, (conn:read_response()))
      assert.is_false(conn:closed_by_peer(100))
      assert.is_true(conn:closed_by_peer(10000))
      assert.is_true(uv.now() - t0 >= 990)
      assert.same("", conn:read_raw(10)) -- closed silently
      conn:close()
      async.wait_for(function() return srv:connection_count() == 0 end)
      assert.same(0, srv:connection_count())
    end)
  end)

  it("answers 503 over max_connections", function()
    with_server({ max_connections = 2, reserve_connections = 0 }, function(srv)
      srv:route("GET", "/", function(_, res)
        res:send(200, "ok")
      end)
    end, function(srv, port)
      local a, b = async.connect(port), async.connect(port)
      for _, c in ipairs{ a, b } do
        c:send("GET / HTTP/1.1\r\n\r\n")
        assert.same(200, (c:read_response()))
      end
      assert.same(2, srv:connection_count())
      local data, closed = async.raw(port, "GET / HTTP/1.1\r\n\r\n")
      assert.matches("^HTTP/1.1 503 ", data)
      assert.matches("application/json", data)
      assert.matches('{"error":"[^"]+"}$', data)
      assert.is_true(closed)
      a:close()
      async.sleep(50)
      local status = async.http(port, { path = "/" })
      assert.same(200, status)
      b:close()
    end)
  end)

  it("serves immediate answers from the reserve above max_connections, 503 to those that would wait", function()
    with_server({ max_connections = 2, reserve_connections = 2 }, function(srv)
      srv:route("GET", "/", function(_, res)
        res:send(200, "ok")
      end)
      srv:route("GET", "/wait", function(_, res)
        res:on_close(function() end)
      end)
    end, function(srv, port)
      local a, b = async.connect(port), async.connect(port)
      for _, c in ipairs{ a, b } do
        c:send("GET /wait HTTP/1.1\r\n\r\n")
      end
      assert.is_true(async.wait_for(function() return srv:connection_count() == 2 end, 3000))
      -- the waiting clients fill max_connections: a short request is still answered
      local status, _, body = async.http(port, { path = "/" })
      assert.same(200, status)
      assert.same("ok", body)
      -- one that would wait is refused, with its handler's on_close run
      local data, closed = async.raw(port, "GET /wait HTTP/1.1\r\n\r\n")
      assert.matches("^HTTP/1.1 503 ", data)
      assert.matches('{"error":"too many connections"}$', data)
      assert.is_true(closed)
      -- above max_connections + reserve_connections: 503 before any request, never a silent close
      local c, d = async.connect(port), async.connect(port)
      assert.is_true(async.wait_for(function() return srv:connection_count() == 4 end, 3000))
      data, closed = async.raw(port, "GET / HTTP/1.1\r\n\r\n")
      assert.matches("^HTTP/1.1 503 ", data)
      assert.is_true(closed)
      for _, x in ipairs{ a, b, c, d } do x:close() end
    end)
  end)

  it("answers malformed requests with 400 and closes, while other clients are served", function()
    with_server({}, function(srv)
      srv:route("GET", "/", function(_, res)
        res:send(200, "ok")
      end)
    end, function(_, port)
      local other = async.connect(port)
      local bad = {
        "GARBAGE\r\n\r\n",
        "GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
        "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n",
        "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        "GET / HTTP/1.1\r\nX: a\0b\r\n\r\n",
        "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
      }
      for _, bytes in ipairs(bad) do
        local data, closed = async.raw(port, bytes)
        assert.matches("^HTTP/1.1 400 ", data)
        assert.matches("Content%-Type: application/json", data)
        assert.is_true(closed)
        other:send("GET / HTTP/1.1\r\n\r\n")
        local status, _, body = other:read_response()
        assert.same(200, status)
        assert.same("ok", body)
      end
      other:close()
    end)
  end)

  it("calls on_close when a client leaves during a pending response", function()
    local gone = async.event()
    local pending
    with_server({}, function(srv)
      srv:route("GET", "/wait", function(_, res)
        pending = res
        res:on_close(function()
          gone:set(res:is_open())
        end)
      end)
    end, function(srv, port)
      local conn = async.connect(port)
      conn:send("GET /wait HTTP/1.1\r\n\r\n")
      async.sleep(50)
      assert.is_true(pending:is_open())
      assert.same(1, srv:connection_count())
      conn:close()
      local t0 = uv.now()
      assert.is_false(gone:wait(10000))
      assert.is_true(uv.now() - t0 < 5000) -- failure deadline: told at the close, not at a sweep
      assert.same(0, srv:connection_count())
      assert.same({ nil, "closed" }, { pending:send(200, "late") })
    end)
  end)

  it("turns a handler error into a 500 and keeps serving", function()
    local logged = {}
    with_server({ logger = function(level, message)
      logged[#logged + 1] = level .. ":" .. message
    end }, function(srv)
      srv:route("GET", "/boom", function()
        error("kaput")
      end)
      srv:route("GET", "/fine", function(_, res)
        res:send(200, "fine")
      end)
    end, function(_, port)
      local conn = async.connect(port)
      conn:send("GET /boom HTTP/1.1\r\n\r\nGET /fine HTTP/1.1\r\n\r\n")
      local status, headers, body = conn:read_response()
      assert.same(500, status)
      assert.same("application/json", headers["content-type"])
      assert.is_string(json(body).error)
      status, _, body = conn:read_response()
      assert.same(200, status)
      assert.same("fine", body)
      conn:close()
      assert.is_truthy(table.concat(logged, "\n"):find("error:handler error", 1, true))
    end)
  end)

  describe("static files", function()
    local root
    before_each(function()
      root = assert(uv.fs_mkdtemp("/tmp/longpoll-static-XXXXXX"))
      assert(uv.fs_mkdir(root .. "/pub", 493))
      assert(uv.fs_mkdir(root .. "/pub/sub", 493))
      local files = {
        ["secret.txt"] = "top secret",
        ["pub/index.html"] = "<h1>home</h1>",
        ["pub/app.js"] = "let x = 1;",
        ["pub/style.css"] = "body{}",
        ["pub/data.json"] = "{}",
        ["pub/pic.svg"] = "<svg/>",
        ["pub/pic.png"] = "\137PNG",
        ["pub/notes.txt"] = "notes",
        ["pub/favicon.ico"] = "ico",
        ["pub/.hidden"] = "hidden",
        ["pub/sub/index.html"] = "sub home",
      }
      for name, content in pairs(files) do
        local f = assert(io.open(root .. "/" .. name, "wb"))
        f:write(content)
        f:close()
      end
    end)
    after_each(function()
      os.execute("rm -rf '" .. root .. "'")
    end)

    it("serves files with their content types and index.html", function()
      with_server({}, function(srv)
        srv:static("/static/", root .. "/pub")
        srv:static("/", root .. "/pub")
      end, function(_, port)
        local types = {
          ["/static/app.js"] = "application/javascript; charset=utf-8",
          ["/static/index.html"] = "text/html; charset=utf-8",
          ["/static/style.css"] = "text/css; charset=utf-8",
          ["/static/data.json"] = "application/json",
          ["/static/pic.svg"] = "image/svg+xml",
          ["/static/pic.png"] = "image/png",
          ["/static/notes.txt"] = "text/plain; charset=utf-8",
          ["/favicon.ico"] = "image/x-icon",
        }
        for path, ctype in pairs(types) do
          local status, headers = async.http(port, { path = path })
          assert.same(200, status, path)
          assert.same(ctype, headers["content-type"], path)
        end
        local status, headers, body = async.http(port, { path = "/" })
        assert.same(200, status)
        assert.same("<h1>home</h1>", body)
        assert.same("text/html; charset=utf-8", headers["content-type"])
        status, _, body = async.http(port, { path = "/static/sub/" })
        assert.same(200, status)
        assert.same("sub home", body)
        status, headers, body = async.http(port, { method = "HEAD", path = "/static/app.js" })
        assert.same(200, status)
        assert.same("10", headers["content-length"])
        assert.same("", body)
        assert.same(404, (async.http(port, { path = "/static/missing.js" })))
        assert.same(404, (async.http(port, { path = "/static/sub" }))) -- a directory
        status, headers = async.http(port, { method = "POST", path = "/static/app.js" })
        assert.same(405, status)
        assert.same("GET, HEAD", headers.allow)
      end)
    end)

    it("never leaves its directory", function()
      with_server({}, function(srv)
        srv:static("/static/", root .. "/pub")
      end, function(_, port)
        local attempts = {
          ["/static/../secret.txt"] = 404,
          ["/static/sub/../../secret.txt"] = 404,
          ["/static/%2e%2e/secret.txt"] = 404,
          ["/static/%2E%2E%2Fsecret.txt"] = 404,
          ["/static/.%2e/secret.txt"] = 404,
          ["/static/.hidden"] = 404,
          ["/static/..%5csecret.txt"] = 400,
          ["/static/a%00.txt"] = 400,
        }
        for path, expected in pairs(attempts) do
          local status, _, body = async.http(port, { path = path })
          assert.same(expected, status, path)
          assert.is_nil(body:find("top secret", 1, true), path)
        end
      end)
    end)

    -- A file of n bytes whose content says where each byte is (any slice can be checked).
    local function make_file(path, n)
      local f = assert(io.open(path, "wb"))
      local block = {}
      for k = 0, 8191 do block[#block + 1] = string.char(k % 251) end
      block = table.concat(block)
      local left = n
      while left > 0 do
        local piece = block:sub(1, math.min(#block, left))
        f:write(piece)
        left = left - #piece
      end
      f:close()
      return function(first, last) -- the expected bytes [first, last]
        local out = {}
        for k = first, last do out[#out + 1] = string.char((k % 8192) % 251) end
        return table.concat(out)
      end
    end

    it("streams a large file, answers single ranges (206, suffix, 416) and HEAD with its length", function()
      local size = 3 * 1024 * 1024 + 17
      local slice = make_file(root .. "/pub/big.bin", size)
      with_server({}, function(srv)
        srv:static("/static/", root .. "/pub")
      end, function(srv, port)
        local _
        local status, headers, body = async.http(port, { path = "/static/big.bin", timeout_ms = 15000 })
        assert.same(200, status)
        assert.same(tostring(size), headers["content-length"])
        assert.same("bytes", headers["accept-ranges"])
        assert.same(size, #body)
        assert.is_true(body:sub(1, 5000) == slice(0, 4999) and body:sub(-5000) == slice(size - 5000, size - 1))
        status, headers, body = async.http(port, { path = "/static/big.bin", headers = { Range = "bytes=100000-100099" } })
        assert.same(206, status)
        assert.same("bytes 100000-100099/" .. size, headers["content-range"])
        assert.same(slice(100000, 100099), body)
        status, headers, body = async.http(port, { path = "/static/big.bin", headers = { Range = "bytes=-10" } })
        assert.same(206, status)
        assert.same("bytes " .. (size - 10) .. "-" .. (size - 1) .. "/" .. size, headers["content-range"])
        assert.same(slice(size - 10, size - 1), body)
        status, headers, body = async.http(port, { path = "/static/big.bin", headers = { Range = "bytes=" .. (size - 3) .. "-99999999" } })
        assert.same(206, status)
        assert.same("bytes " .. (size - 3) .. "-" .. (size - 1) .. "/" .. size, headers["content-range"])
        assert.same(slice(size - 3, size - 1), body)
        status, headers = async.http(port, { path = "/static/big.bin", headers = { Range = "bytes=" .. size .. "-" } })
        assert.same(416, status)
        assert.same("bytes */" .. size, headers["content-range"])
        -- several ranges are not served as multipart: the whole file
        status, _, body = async.http(port, { path = "/static/notes.txt", headers = { Range = "bytes=0-1,3-4" } })
        assert.same(200, status)
        assert.same("notes", body)
        status, headers, body = async.http(port, { method = "HEAD", path = "/static/big.bin" })
        assert.same(200, status)
        assert.same(tostring(size), headers["content-length"])
        assert.same("", body)
        -- the connection is still good for the next request after a streamed file
        local conn = async.connect(port)
        conn:send("GET /static/big.bin HTTP/1.1\r\nRange: bytes=0-9\r\n\r\nGET /static/notes.txt HTTP/1.1\r\n\r\n")
        status, _, body = conn:read_response()
        assert.same(206, status)
        assert.same(slice(0, 9), body)
        status, _, body = conn:read_response()
        assert.same(200, status)
        assert.same("notes", body)
        conn:close()
        assert.is_true(async.wait_for(function() return srv:connection_count() == 0 end, 3000))
      end, 30000)
    end)

    it("serves regular files only: a FIFO is 404 at once and stalls nothing; long names are 404", function()
      assert.is_true(os.execute("mkfifo '" .. root .. "/pub/pipe.txt'") == true, "mkfifo")
      with_server({}, function(srv)
        srv:static("/static/", root .. "/pub")
      end, function(_, port)
        -- several at once: a FIFO opened for reading would hold a thread of libuv's pool each
        local tasks, statuses = {}, {}
        for i = 1, 8 do
          tasks[i] = async.spawn(function()
            statuses[i] = (async.http(port, { path = "/static/pipe.txt", timeout_ms = 5000 }))
          end)
        end
        async.wait_all(tasks)
        for i = 1, 8 do assert.same(404, statuses[i]) end
        local status, _, body = async.http(port, { path = "/static/notes.txt" })
        assert.same(200, status)
        assert.same("notes", body)
        assert.same(404, (async.http(port, { path = "/static/" .. ("n"):rep(300) .. ".txt" })))
        assert.same(404, (async.http(port, { path = "/static/" .. ("d/"):rep(3000) .. "x" })))
      end)
    end)

    it("refuses symlinks that leave the directory unless follow_symlinks is set", function()
      assert(uv.fs_symlink(root .. "/secret.txt", root .. "/pub/out.txt"))
      assert(uv.fs_symlink(root .. "/pub/notes.txt", root .. "/pub/in.txt"))
      assert(uv.fs_symlink(root, root .. "/pub/up"))
      with_server({}, function(srv)
        srv:static("/static/", root .. "/pub")
        srv:static("/open/", root .. "/pub", { follow_symlinks = true })
      end, function(_, port)
        local status, _, body = async.http(port, { path = "/static/out.txt" })
        assert.same(404, status)
        assert.is_nil(body:find("top secret", 1, true))
        assert.same(404, (async.http(port, { path = "/static/up/secret.txt" })))
        status, _, body = async.http(port, { path = "/static/in.txt" }) -- inside: served
        assert.same(200, status)
        assert.same("notes", body)
        status, _, body = async.http(port, { path = "/open/out.txt" })
        assert.same(200, status)
        assert.same("top secret", body)
      end)
    end)

    it("gives a reader slower than the linger time the whole file over HTTP/1.0, output bounded", function()
      local size = 8 * 1024 * 1024
      local slice = make_file(root .. "/pub/slow.bin", size)
      with_server({}, function(srv)
        srv:static("/static/", root .. "/pub")
      end, function(srv, port)
        local tcp = uv.new_tcp()
        local got, total, eof, max_queued = {}, 0, false, 0
        local started = uv.now()
        local connected = async.event()
        tcp:connect("127.0.0.1", port, function(err) connected:set(err == nil) end)
        assert.is_true(connected:wait(3000))
        tcp:write("GET /static/slow.bin HTTP/1.0\r\n\r\n")
        local resume_at = 256 * 1024
        local pause = uv.new_timer()
        local on_read
        on_read = function(err, data)
          if err or not data then
            eof = true
            return
          end
          got[#got + 1] = data
          total = total + #data
          if total >= resume_at then -- reads 256 KiB, then nothing for 120 ms
            resume_at = total + 256 * 1024
            tcp:read_stop()
            for _, c in ipairs(srv:connections()) do max_queued = math.max(max_queued, c.queued) end
            pause:start(120, 0, function() tcp:read_start(on_read) end)
          end
        end
        tcp:read_start(on_read)
        assert.is_true(async.wait_for(function() return eof end, 20000), "end of the answer")
        local took = uv.now() - started
        pause:close()
        tcp:close()
        local data = table.concat(got)
        local head_end = data:find("\r\n\r\n", 1, true)
        local body = data:sub(head_end + 4)
        assert.is_true(took > 2000, "the reader must be slower than the 2 s linger: took " .. took .. " ms")
        assert.same(size, #body)
        assert.is_true(body:sub(-1000) == slice(size - 1000, size - 1))
        assert.is_true(max_queued <= 8 * 1024 * 1024, "queued " .. max_queued)
      end, 30000)
    end)

    -- The files this process has open (the engine reads static files with libuv file requests).
    local function open_fds()
      local n = 0
      local dir = assert(uv.fs_scandir("/proc/self/fd"))
      while uv.fs_scandir_next(dir) do n = n + 1 end
      return n
    end

    it("is served by the engine without Lua: routes first, JSON errors, a client gone mid-file frees the file", function()
      make_file(root .. "/pub/big.bin", 4 * 1024 * 1024)
      with_server({}, function(srv)
        srv:static("/static/", root .. "/pub")
        srv:route("GET", "/static/notes.txt", function(_, res) res:send(200, "a route") end)
      end, function(srv, port)
        local _
        local status, headers, body = async.http(port, { path = "/static/notes.txt" })
        assert.same(200, status)
        assert.same("text/plain; charset=utf-8", headers["content-type"])
        assert.same("a route", body) -- a route's path is never the mount's
        local before = srv:fast_answers()
        status, _, body = async.http(port, { path = "/static/app.js" })
        assert.same(200, status)
        assert.same("let x = 1;", body)
        assert.same(before + 1, srv:fast_answers()) -- answered in C
        status, headers, body = async.http(port, { path = "/static/missing.js" })
        assert.same(404, status)
        assert.same("application/json", headers["content-type"])
        assert.same({ error = "not found" }, json(body))
        status, headers, body = async.http(port, { path = "/static/app.js", headers = { Range = "bytes=99-" } })
        assert.same(416, status)
        assert.same("application/json", headers["content-type"])
        assert.same({ error = "range not satisfiable" }, json(body))
        assert.same("bytes */10", headers["content-range"])
        -- a client that leaves after the first bytes of a large file: the file is closed
        assert.is_true(async.wait_for(function() return #srv:connections() == 0 end, 5000))
        local fds = open_fds()
        local conn = async.connect(port)
        conn:send("GET /static/big.bin HTTP/1.1\r\n\r\n")
        assert.is_true(async.wait_for(function()
          conn:wait_data(100)
          return #conn.buf > 100000
        end, 5000))
        conn:close()
        assert.is_true(async.wait_for(function() return #srv:connections() == 0 and open_fds() == fds end, 5000),
          "open files: " .. open_fds() .. ", before: " .. fds)
        -- and the next client gets the whole file
        status, _, body = async.http(port, { path = "/static/big.bin", timeout_ms = 15000 })
        assert.same(200, status)
        assert.same(4 * 1024 * 1024, #body)
      end, 30000)
    end)
  end)

  it("streams with write_head, write and finish", function()
    with_server({}, function(srv)
      srv:route("GET", "/stream", function(_, res)
        res:set_header("Content-Type", "text/event-stream")
        assert(res:write_head(200))
        assert(res:write("data: 1\n\n"))
        later(30, function()
          assert(res:write("data: 2\n\n"))
          assert(res:finish())
          assert.same({ nil, "finished" }, { res:write("x") })
        end)
      end)
    end, function(_, port)
      local conn = async.connect(port)
      conn:send("GET /stream HTTP/1.1\r\n\r\n")
      local status, headers, body = conn:read_response()
      assert.same(200, status)
      assert.same("chunked", headers["transfer-encoding"])
      assert.is_nil(headers["content-length"])
      assert.same("data: 1\n\ndata: 2\n\n", body)
      -- The connection stays usable after a finished stream.
      conn:send("GET /stream HTTP/1.1\r\n\r\n")
      status, _, body = conn:read_response()
      assert.same(200, status)
      assert.same("data: 1\n\ndata: 2\n\n", body)
      conn:close()
      -- HTTP/1.0 has no chunked encoding: the body ends with the connection.
      local data, closed = async.raw(port, "GET /stream HTTP/1.0\r\n\r\n")
      assert.matches("\r\n\r\ndata: 1\n\ndata: 2\n\n$", data)
      assert.is_true(closed)
    end)
  end)

  it("reports the port it picked, refuses a busy port and bad options", function()
    with_server({ port = 0 }, function() end, function(srv, port)
      assert.is_true(port > 0)
      assert.same(port, srv.port)
      assert.same("127.0.0.1", srv.host)
      local other = assert(server.new{ port = port })
      local ok, err = other:listen()
      assert.is_nil(ok)
      assert.matches("EADDRINUSE", err)
    end)
    for _, case in ipairs{
      { { max_body_bytes = -1 }, "max_body_bytes" },
      { { port = 70000 }, "port" },
      { { header_timeout_ms = "soon" }, "header_timeout_ms" },
      { { logger = true }, "logger" },
      { { max_conections = 5 }, "max_conections" },
    } do
      local srv, err = server.new(case[1])
      assert.is_nil(srv)
      assert.matches(case[2], err, 1, true)
    end
  end)

  it("serves on ::1", function()
    with_server({ host = "::1" }, function(srv)
      srv:route("GET", "/", function(req, res)
        res:send(200, req.remote_addr)
      end)
    end, function(_, port)
      local status, _, body = async.http(port, { host = "::1", path = "/" })
      assert.same(200, status)
      assert.matches("^%[::1%]:%d+$", body)
    end)
  end)

  it("closes idle connections at once, pending ones after their answer, and leaves no handles", function()
    async.run(function()
      local before = {}
      uv.walk(function(h)
        before[h] = true
      end)
      local pending
      local srv = assert(server.new{})
      srv:route("GET", "/", function(_, res)
        res:send(200, "ok")
      end)
      srv:route("GET", "/wait", function(_, res)
        pending = res
      end)
      local port = assert(srv:listen())
      local idle = async.connect(port)
      idle:send("GET / HTTP/1.1\r\n\r\n")
      assert.same(200, (idle:read_response()))
      local waiting = async.connect(port)
      waiting:send("GET /wait HTTP/1.1\r\n\r\n")
      async.sleep(30)
      local closed = async.event()
      srv:close(function()
        closed:set()
      end)
      assert.is_true(idle:closed_by_peer(1000))
      assert.is_nil(closed:wait(100)) -- the pending response holds the close back
      assert.is_true(pending:send(200, "bye"))
      local status, headers, body = waiting:read_response()
      assert.same(200, status)
      assert.same("close", headers.connection)
      assert.same("bye", body)
      assert.is_true(closed:wait(2000))
      local left = {}
      uv.walk(function(h)
        if not before[h] and not async.owns(h) then
          left[#left + 1] = tostring(h)
        end
      end)
      assert.same({}, left)
      idle:close()
      waiting:close()
    end)
  end)

  it("serves 300 concurrent clients that each get a delayed answer", function()
    with_server({}, function(srv)
      srv:route("GET", "/delay", function(req, res)
        later(100, function()
          res:send(200, req.query.i)
        end)
      end)
    end, function(srv, port)
      local tasks, results = {}, {}
      for i = 1, 300 do
        tasks[i] = async.spawn(function()
          local status, _, body = async.http(port, { path = "/delay?i=" .. i })
          results[i] = status == 200 and body == tostring(i)
        end)
      end
      async.wait_all(tasks)
      for i = 1, 300 do
        assert.is_true(results[i], "client " .. i)
      end
      -- the clients closed; the server notices each EOF
      async.wait_for(function() return srv:connection_count() == 0 end)
      assert.same(0, srv:connection_count())
    end, 15000)
  end)
end)
