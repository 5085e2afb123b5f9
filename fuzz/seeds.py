#!/usr/bin/env python3
"""Writes the seed inputs of fuzz/corpus/ (run it again when the input format
of fuzz_store.c changes). Seeds are committed; the fuzzer's own finds are not."""
import os

here = os.path.dirname(os.path.abspath(__file__))

JSON = {
    'publish_basic.json': b'{"category":"news","data":{"text":"hello","n":[1,2.5e-3,-0]}}',
    'publish_escapes.json': b' {"data":"\\u00e9\\ud83d\\ude00\\n","category":"caf\\u00e9\\/x"} ',
    'publish_dup_keys.json': b'{"category":1,"category":"b","data":null,"data":[true,false,null]}',
    'publish_empty.json': b'{}',
    'nested.json': b'[[[[{"a":[{"b":{}}]}]]]]',
    'numbers.json': b'[0,-1,1.5,1e10,-2.25E-7,123456789012345678901234567890]',
    'utf8.txt': '\u00e9t\u00e9 \u2603 \U0001F600'.encode(),
    'bad_utf8.txt': b'"\xc3\x28\xed\xa0\x80\xf4\x90\x80\x80"',
    'controls.txt': b'a\x00b\x1f"\\\x7f',
}

# fuzz_store programs: 5 config bytes, then operations (opcode byte % 12).
PUB, WAIT, CANCEL, FETCH, MARK, EXPIRE, STEP, JUMP, TAKE_WAITERS, FAIL_ALLOC = 0, 2, 3, 4, 6, 7, 8, 9, 10, 11
A, B, NEWS, ETE, EMPTY, FF, SURR, LONG8, TOOLONG, TRUNC = range(10)


def g(i):  # generated category "g<i>"
    return 0x80 | i


def pub(n, d=0):
    return [PUB, n, d]


def wait(*ns):
    return [WAIT, len(ns) - 1] + list(ns)


def fetch(ns, pick=0, since=1, lastid=0, extra=(), prefix=0):
    r = [FETCH, len(ns) - 1] + list(ns) + [pick, since] + (list(extra) if since == 6 else []) + [lastid]
    if lastid in (3, 4):
        r.append(0)
    return r + [prefix]


def cfg(buf=4, daf=0, ttl_mode=0, ttl=0, max_cat=0, max_wait=0, max_name=8, byte_cap=0):
    """byte_cap: 0 for none, else 40 + 16 * k (k < 32)."""
    b0 = (buf - 1) | (daf << 3) | (ttl_mode << 4)
    b2 = 3 | ((max_cat - 1) << 2) if max_cat else 0
    b3 = (3 | ((max_wait - 1) << 2) if max_wait else 0) | ((max_name - 4) << 4)
    b4 = 3 | (((byte_cap - 40) // 16) << 2) if byte_cap else 0
    return [b0, ttl, b2, b3, b4]


STORE = {
    'basic': cfg() + pub(A) + pub(A, 2) + [STEP, 5] + pub(B, 3) + fetch([A]) + wait(A) + pub(A, 1)
    + fetch([A], 1, 1, 1, prefix=1) + [MARK] + pub(A) + [EXPIRE],
    'same_ms_cursor': cfg(buf=8, max_name=11) + pub(A) + pub(B) + pub(A) + pub(A) + fetch([A, B], 1, 1, 1)
    + fetch([A, B], 2, 1, 2) + fetch([A], 0, 1, 0) + fetch([A], 0, 3, 3),
    'overflow_missed': cfg(buf=2) + pub(A) + [STEP, 1] + pub(A) + [STEP, 1] + pub(A) + [STEP, 1] + pub(A)
    + fetch([A], 0, 0, 0) + fetch([A], 1, 1, 1) + fetch([A], 2, 1, 1),
    'ttl_clock_back': cfg(ttl_mode=2, ttl=5) + pub(A) + [JUMP, 0x83] + pub(A) + [STEP, 3] + pub(B) + [MARK]
    + [JUMP, 0x81] + pub(A) + [STEP, 10] + [EXPIRE] + fetch([A, B], 0, 0, 0) + [JUMP, 1] + [EXPIRE],
    'delete_after_first': cfg(daf=1) + wait(A, B) + pub(A) + pub(A, 3) + fetch([A]) + fetch([A]) + wait(A)
    + wait(B) + [CANCEL, 1, 1] + pub(B) + fetch([A, B], 0, 6, 0, extra=[0xff] * 8),
    'limits_and_names': cfg(max_cat=2, max_wait=2, max_name=5) + pub(EMPTY) + pub(FF) + pub(SURR) + pub(TRUNC)
    + pub(TOOLONG) + pub(LONG8) + pub(ETE) + wait(A, NEWS) + wait(A) + wait(A) + pub(NEWS) + [CANCEL, 0, 1, 0]
    + [CANCEL, 1, 0] + [CANCEL, 1, 0],
    'many_categories': cfg(buf=1, ttl_mode=3, ttl=100) + sum([pub(g(i)) for i in range(80)], [])
    + wait(g(1), g(2), g(3)) + [JUMP, 10, EXPIRE] + fetch([g(1)]) + [CANCEL, 1, 0],
    'byte_cap': cfg(buf=8, byte_cap=40 + 16 * 20) + pub(A) + pub(A, 3) + pub(B) + pub(A) + pub(NEWS, 3)
    + fetch([A, B, NEWS], 0, 0, 0) + pub(B) + pub(B) + fetch([B], 0, 0, 0),
    'byte_cap_too_small': cfg(byte_cap=56) + pub(A) + [MARK] + pub(A) + fetch([A]),
    'take_waiters': cfg(daf=1) + wait(A, B) + wait(B) + wait(NEWS) + [TAKE_WAITERS, B] + [TAKE_WAITERS, B]
    + [TAKE_WAITERS, FF] + [TAKE_WAITERS, NEWS] + pub(A) + fetch([A], 0, 0, 0),
    'out_of_memory': cfg(daf=1) + pub(A) + [FAIL_ALLOC, 0] + wait(B, NEWS) + [FAIL_ALLOC, 1] + wait(B, NEWS)
    + [FAIL_ALLOC, 0] + fetch([A], 0, 0, 0) + fetch([A], 0, 0, 0) + [FAIL_ALLOC, 2] + pub(A) + pub(A),
}

# fuzz_http inputs: 4 config bytes (max_header_bytes 16 + 4*b0, max_body_bytes 1 + b1,
# max_url_bytes 1 + b2 % 96, b3: how the stream is cut, and with 0x80 a failing allocation), then
# the bytes a client sends.
def http(stream, b0=255, b1=100, b2=63, b3=3):
    return bytes([b0, b1, b2, b3]) + stream


HTTP = {
    'get': http(b'GET /events?category=a&timeout=30&since_time=1&last_id=x HTTP/1.1\r\nHost: h\r\n\r\n'),
    'publish': http(b'POST /publish HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 30\r\n\r\n'
                    b'{"category":"a","data":"hello"}GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n'),
    'chunked': http(b'POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n'
                    b'5;ext=1\r\nhello\r\n1\r\n \r\n0\r\nX-Trailer: 1\r\n\r\n\r\nGET /next HTTP/1.1\n\n'),
    'targets': http(b'GET http://h:1/a%20b?k=1+2&k=%33&&x HTTP/1.1\r\nA:  b \t\r\nA: c\r\n\r\n'
                    b'OPTIONS * HTTP/1.1\r\n\r\nGET /%zz HTTP/1.1\r\n\r\n'),
    'limits': http(b'POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n12345'
                   b'GET /' + b'u' * 80 + b' HTTP/1.1\r\n\r\n', b0=40, b1=4, b2=40, b3=0x40),
    'out_of_memory': http(b'GET / HTTP/1.1\r\n' + b'X: 1\r\n' * 20 + b'\r\n', b3=0x82),
}

# fuzz_static inputs: fields cut at 0x01: a decoded request path (its last 8 bytes also give a
# file size), a Range value, then mount prefixes and routes ("=" + path).
STATIC = {
    'mounts': b'/static/js/app.js\x01bytes=0-9\x01/\x01/static\x01/static/js/\x01=/static/js/x',
    'ranges': b'/a/b.txt\x01 bytes = -5 \x01/a/',
    'dots': b'/s/sub/../.hidden\\x\x01bytes=1-0\x01/s/\x01/r/',
    'big': b'/r/' + b'n' * 300 + b'\x01bytes=999999999999999-\x01/r',
}

for sub, files in (('json', JSON), ('store', {k: bytes(v) for k, v in STORE.items()}), ('http', HTTP),
                   ('static', STATIC)):
    os.makedirs(os.path.join(here, 'corpus', sub), exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(here, 'corpus', sub, name), 'wb') as f:
            f.write(data)
