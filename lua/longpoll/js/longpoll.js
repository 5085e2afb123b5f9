/*
 * longpoll.js: browser client for longpoll (and golongpoll) servers. Plain JavaScript, no
 * build step: load it with <script src="/js/longpoll.js"> (defines window.longpoll) or
 * import it as a module through longpoll.mjs. Options follow golongpoll's js-client.
 */
(function (root, factory) {
  'use strict';
  var api = factory();
  if (typeof module === 'object' && module && module.exports) {
    module.exports = api;
  }
  root.longpoll = api;
})(typeof globalThis !== 'undefined' ? globalThis : this, function () {
  'use strict';

  var MAX_CATEGORY_BYTES = 1024;
  // A poll may take pollTimeoutSeconds; this much longer and the server is presumed lost.
  var POLL_GRACE_MS = 15000;
  var PUBLISH_TIMEOUT_MS = 30000;

  function byteLength(s) {
    return new TextEncoder().encode(s).length;
  }

  function isCategory(c) {
    return typeof c === 'string' && c.length > 0 && byteLength(c) <= MAX_CATEGORY_BYTES;
  }

  function isSeconds(v, min, whole) {
    return typeof v === 'number' && isFinite(v) && v >= min && (!whole || Math.floor(v) === v);
  }

  function base64Utf8(s) {
    var bytes = new TextEncoder().encode(s);
    var bin = '';
    for (var i = 0; i < bytes.length; i++) bin += String.fromCharCode(bytes[i]);
    return btoa(bin);
  }

  function sessionStore() {
    try {
      return typeof sessionStorage !== 'undefined' ? sessionStorage : null;
    } catch (e) {
      return null; // storage disabled (privacy settings, sandboxed frames)
    }
  }

  var KNOWN = [
    'subscribeUrl', 'publishUrl', 'category', 'sinceTime', 'lastId', 'onEvent', 'onFailure',
    'onMissed', 'pollTimeoutSeconds', 'reattemptWaitSeconds', 'successWaitSeconds',
    'sucessWaitSeconds', 'basicAuthUsername', 'basicAuthPassword', 'extraRequestHeaders',
    'headers', 'loggingEnabled', 'resume', 'publishRetries', 'idempotentPublish',
  ];

  // A publish that got a 503 or no answer is sent again with the same Idempotency-Key after
  // PUBLISH_RETRY_BASE_MS, then twice that, ... (the server stores it once).
  var PUBLISH_RETRY_BASE_MS = 100;

  // A random (version 4) UUID: the Idempotency-Key of one publish.
  function uuid4() {
    var b = new Uint8Array(16);
    crypto.getRandomValues(b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    var h = Array.prototype.map.call(b, function (x) { return (x + 0x100).toString(16).slice(1); }).join('');
    return h.slice(0, 8) + '-' + h.slice(8, 12) + '-' + h.slice(12, 16) + '-' + h.slice(16, 20) + '-' + h.slice(20);
  }

  // Returns the checked options with defaults, or throws a TypeError naming the option.
  function checkOptions(o) {
    if (!o || typeof o !== 'object') throw new TypeError('options must be an object');
    Object.keys(o).forEach(function (k) {
      if (KNOWN.indexOf(k) < 0) throw new TypeError("unknown option '" + k + "'");
    });
    var c = {};
    c.categories = Array.isArray(o.category) ? o.category.slice() : [o.category];
    if (c.categories.length === 0 || !c.categories.every(isCategory)) {
      throw new TypeError("option 'category' must be a string of 1-1024 bytes, or an array of them");
    }
    if (!o.subscribeUrl && !o.publishUrl) {
      throw new TypeError("at least one of the options 'subscribeUrl' and 'publishUrl' must be given");
    }
    c.subscribeUrl = o.subscribeUrl || null;
    c.publishUrl = o.publishUrl || null;
    function seconds(name, def, min, whole) {
      var v = o[name];
      if (v === undefined || v === null) return def;
      if (!isSeconds(v, min, whole)) {
        throw new TypeError("option '" + name + "' must be " + (whole ? 'a whole number' : 'a number') +
          ' of seconds, at least ' + min);
      }
      return v;
    }
    c.pollTimeoutSeconds = seconds('pollTimeoutSeconds', 45, 1, true);
    c.reattemptWaitSeconds = seconds('reattemptWaitSeconds', 30, 0, false);
    // golongpoll's client spells it 'sucessWaitSeconds'; both are accepted
    c.successWaitSeconds = seconds(o.successWaitSeconds !== undefined ? 'successWaitSeconds' : 'sucessWaitSeconds', 0, 0, false);
    if (o.sinceTime !== undefined && o.sinceTime !== null &&
        !(Number.isSafeInteger(o.sinceTime) && o.sinceTime >= 0)) {
      throw new TypeError("option 'sinceTime' must be epoch milliseconds (an integer >= 0)");
    }
    c.sinceTime = o.sinceTime === undefined ? null : o.sinceTime;
    if (o.lastId !== undefined && o.lastId !== null && o.lastId !== '') {
      if (typeof o.lastId !== 'string') throw new TypeError("option 'lastId' must be a string");
      if (c.sinceTime === null) throw new TypeError("option 'lastId' needs 'sinceTime'");
      c.lastId = o.lastId;
    } else {
      c.lastId = null;
    }
    ['onEvent', 'onFailure', 'onMissed'].forEach(function (name) {
      if (o[name] !== undefined && o[name] !== null && typeof o[name] !== 'function') {
        throw new TypeError("option '" + name + "' must be a function");
      }
      c[name] = o[name] || null;
    });
    var user = o.basicAuthUsername || '';
    var password = o.basicAuthPassword || '';
    if (typeof user !== 'string' || typeof password !== 'string' || (user === '') !== (password === '')) {
      throw new TypeError("options 'basicAuthUsername' and 'basicAuthPassword' must be given together, or neither");
    }
    c.headers = [];
    if (user) c.headers.push(['Authorization', 'Basic ' + base64Utf8(user + ':' + password)]);
    var extra = o.extraRequestHeaders || [];
    if (!Array.isArray(extra)) throw new TypeError("option 'extraRequestHeaders' must be an array of {key, value}");
    extra.forEach(function (h) {
      if (!h || typeof h.key !== 'string' || typeof h.value !== 'string') {
        throw new TypeError("option 'extraRequestHeaders' must be an array of {key, value} strings");
      }
      c.headers.push([h.key, h.value]);
    });
    var headers = o.headers || {};
    if (typeof headers !== 'object' || Array.isArray(headers)) throw new TypeError("option 'headers' must be an object");
    Object.keys(headers).forEach(function (name) {
      if (typeof headers[name] !== 'string') throw new TypeError("option 'headers': '" + name + "' must be a string");
      c.headers.push([name, headers[name]]);
    });
    c.loggingEnabled = o.loggingEnabled === true;
    // publishes carry an Idempotency-Key and are retried with it (false: golongpoll's plain publish)
    c.idempotentPublish = o.idempotentPublish !== false;
    var retries = o.publishRetries === undefined || o.publishRetries === null ? 3 : o.publishRetries;
    if (!Number.isInteger(retries) || retries < 0 || retries > 10) {
      throw new TypeError("option 'publishRetries' must be a whole number from 0 to 10");
    }
    c.publishRetries = c.idempotentPublish ? retries : 0;
    if (o.resume && o.resume !== true && typeof o.resume !== 'string') {
      throw new TypeError("option 'resume' must be true or a storage key");
    }
    if (o.resume && !c.subscribeUrl) throw new TypeError("option 'resume' needs 'subscribeUrl'");
    c.resumeKey = !o.resume ? null : typeof o.resume === 'string' ? o.resume
      : 'longpoll:' + c.subscribeUrl + '#' + c.categories.join('\n');
    return c;
  }

  function Client(options) {
    var c = checkOptions(options);
    this.options = c;
    this.sinceTime = c.sinceTime;
    this.lastId = c.lastId;
    this.running = false;
    this.error = null;
    this._abort = null;
    this._timer = null;
    if (c.resumeKey) {
      var store = sessionStore();
      var saved = null;
      try {
        saved = store && JSON.parse(store.getItem(c.resumeKey) || 'null');
      } catch (e) {
        saved = null;
      }
      if (saved && Number.isSafeInteger(saved.sinceTime)) {
        this.sinceTime = saved.sinceTime;
        this.lastId = typeof saved.lastId === 'string' ? saved.lastId : null;
      }
    }
  }

  Client.prototype._log = function (msg) {
    if (this.options.loggingEnabled && typeof console !== 'undefined') {
      console.log('longpoll client[' + JSON.stringify(this.options.categories) + ']: ' + msg);
    }
  };

  Client.prototype._save = function () {
    var key = this.options.resumeKey;
    var store = key && sessionStore();
    if (!store || this.sinceTime === null) return;
    try {
      store.setItem(key, JSON.stringify({ sinceTime: this.sinceTime, lastId: this.lastId }));
    } catch (e) {
      // a full or disabled storage only costs the resume
    }
  };

  // Runs a user callback; an exception stops the client (kept in client.error, logged).
  Client.prototype._call = function (fn, args) {
    try {
      return { value: fn.apply(null, args) };
    } catch (e) {
      this.error = e;
      if (typeof console !== 'undefined') console.error('longpoll client: callback failed; client stopped:', e);
      this.stop();
      return null;
    }
  };

  Client.prototype._url = function () {
    var params = [];
    var esc = encodeURIComponent;
    this.options.categories.forEach(function (c) { params.push('category=' + esc(c)); });
    params.push('timeout=' + this.options.pollTimeoutSeconds);
    if (this.sinceTime !== null) {
      params.push('since_time=' + this.sinceTime);
      if (this.lastId) params.push('last_id=' + esc(this.lastId));
    }
    var url = this.options.subscribeUrl;
    return url + (url.indexOf('?') < 0 ? '?' : '&') + params.join('&');
  };

  Client.prototype._headers = function (extra) {
    var h = new Headers();
    this.options.headers.forEach(function (pair) { h.append(pair[0], pair[1]); });
    if (extra) Object.keys(extra).forEach(function (k) { h.set(k, extra[k]); });
    return h;
  };

  Client.prototype._wait = function (seconds) {
    var self = this;
    return new Promise(function (resolve) {
      if (seconds <= 0) return resolve();
      self._timer = setTimeout(function () { self._timer = null; resolve(); }, seconds * 1000);
    });
  };

  // One poll: resolves with the decoded answer, rejects with an Error (message for onFailure).
  Client.prototype._pollOnce = function () {
    var self = this;
    var controller = new AbortController();
    this._abort = controller;
    var guard = setTimeout(function () { controller.abort(); }, this.options.pollTimeoutSeconds * 1000 + POLL_GRACE_MS);
    return fetch(this._url(), {
      method: 'GET',
      headers: this._headers({ Accept: 'application/json' }),
      cache: 'no-store',
      credentials: 'same-origin',
      signal: controller.signal,
    }).then(function (res) {
      if (res.status !== 200) throw new Error('request FAILED, response status: ' + res.status);
      return res.text();
    }).then(function (text) {
      try {
        return JSON.parse(text);
      } catch (e) {
        throw new Error('could not decode poll response: ' + e.message);
      }
    }).finally(function () {
      clearTimeout(guard);
      if (self._abort === controller) self._abort = null;
    });
  };

  Client.prototype._fail = function (message) {
    this._log('poll failed: ' + message);
    if (this.options.onFailure) {
      var r = this._call(this.options.onFailure, [message]);
      if (!r) return false;
      if (r.value === false) {
        this._log('stopping: onFailure returned false');
        this.stop();
        return false;
      }
    }
    return this.running;
  };

  Client.prototype._deliver = function (answer, alive) {
    var events = answer.events;
    for (var i = 0; i < events.length; i++) {
      var e = events[i];
      if (!e || !Number.isSafeInteger(e.timestamp) || typeof e.id !== 'string') {
        this._fail('malformed event in poll response');
        return false; // the loop waits reattemptWaitSeconds

      }
    }
    if (answer.missed === true && this.options.onMissed) {
      if (!this._call(this.options.onMissed, [events[0], this.sinceTime, this.lastId]) || !alive()) return false;
    }
    for (var j = 0; j < events.length; j++) {
      this.sinceTime = events[j].timestamp;
      this.lastId = events[j].id;
      this._save();
      if (this.options.onEvent && !this._call(this.options.onEvent, [events[j]])) return false;
      if (!alive()) return false;
    }
    return true;
  };

  Client.prototype._loop = async function (run) {
    var self = this;
    function alive() { return self.running && self._run === run; }
    // Each pass is one poll; stop() ends it (the fetch in flight is aborted), and a loop left
    // over from before a stop() and start() notices that it is not the current run.
    while (alive()) {
      var answer;
      try {
        answer = await this._pollOnce();
      } catch (e) {
        if (!alive()) return;
        if (!this._fail(e && e.name === 'AbortError' ? 'poll timed out' : String(e && e.message || e)) || !alive()) return;
        await this._wait(this.options.reattemptWaitSeconds);
        continue;
      }
      if (!alive()) return;
      if (answer && Array.isArray(answer.events) && answer.events.length > 0) {
        if (!this._deliver(answer, alive)) {
          if (!alive()) return;
          await this._wait(this.options.reattemptWaitSeconds);
          continue;
        }
        await this._wait(this.options.successWaitSeconds);
      } else if (answer && answer.timeout !== undefined) {
        // continue from the server's time, keeping lastId (as golongpoll's Go client does)
        if (Number.isSafeInteger(answer.timestamp) && (this.sinceTime === null || answer.timestamp > this.sinceTime)) {
          this.sinceTime = answer.timestamp;
          this._save();
        }
        this._log('no events, requesting again.');
      } else {
        var msg = answer && answer.error !== undefined ? String(answer.error)
          : 'client got unexpected response: ' + JSON.stringify(answer);
        if (!this._fail(msg) || !alive()) return;
        await this._wait(this.options.reattemptWaitSeconds);
      }
    }
  };

  // Starts polling (newClient does this); calling it on a running client does nothing.
  Client.prototype.start = function () {
    if (this.running) return this;
    if (!this.options.subscribeUrl) throw new Error("cannot start: option 'subscribeUrl' was not given");
    this.running = true;
    this.error = null;
    this._run = (this._run || 0) + 1;
    this._loop(this._run);
    return this;
  };

  // Stops at once: the poll in flight is aborted and no callback runs afterwards.
  Client.prototype.stop = function () {
    if (!this.running) return;
    this._log('stopping.');
    this.running = false;
    if (this._abort) this._abort.abort();
    if (this._timer) {
      clearTimeout(this._timer);
      this._timer = null;
    }
  };

  // Forgets the cursor kept for `resume` (the next page load starts afresh).
  Client.prototype.forgetResume = function () {
    var store = this.options.resumeKey && sessionStore();
    if (store) store.removeItem(this.options.resumeKey);
  };

  // publish(category, data[, onSuccess, onFail]) -> Promise: resolves when the server took the
  // event, rejects with an Error otherwise. The callbacks are golongpoll's: onFail(status, body).
  // Each publish carries a fresh Idempotency-Key; a 503 or a network error is retried with it
  // (publishRetries times, the delay doubling from 100 ms), so the event is stored once.
  Client.prototype.publish = function (category, data, onSuccess, onFail) {
    var self = this;
    var status = 0, body = '';
    var key = null;
    function attempt(n) {
      var controller = new AbortController();
      var guard = setTimeout(function () { controller.abort(); }, PUBLISH_TIMEOUT_MS);
      var extra = { 'Content-Type': 'application/json', Accept: 'application/json' };
      if (key) extra['Idempotency-Key'] = key;
      return fetch(self.options.publishUrl, {
        method: 'POST',
        headers: self._headers(extra),
        body: JSON.stringify({ category: category, data: data }),
        cache: 'no-store',
        credentials: 'same-origin',
        signal: controller.signal,
      }).then(function (res) {
        status = res.status;
        return res.text();
      }, function (e) {
        status = 0;
        return { networkError: e };
      }).finally(function () { clearTimeout(guard); }).then(function (text) {
        var retryable = typeof text !== 'string' || status === 503;
        if (retryable && n < self.options.publishRetries) {
          self._log('publish retried (' + (n + 1) + ') with the same Idempotency-Key');
          return new Promise(function (resolve) { setTimeout(resolve, PUBLISH_RETRY_BASE_MS * Math.pow(2, n)); })
            .then(function () { return attempt(n + 1); });
        }
        if (typeof text !== 'string') throw text.networkError;
        return text;
      });
    }
    var p = Promise.resolve().then(function () {
      if (!self.options.publishUrl) throw new Error("cannot publish: option 'publishUrl' was not given");
      if (!isCategory(category)) throw new Error('category must be 1-1024 bytes long');
      if (data === undefined || data === null) throw new Error('data must not be undefined or null');
      if (self.options.idempotentPublish) key = uuid4();
      return attempt(0);
    }).then(function (text) {
      body = text;
      var answer = null;
      try { answer = JSON.parse(text); } catch (e) { answer = null; }
      if (status === 200 && answer && answer.success === true) return undefined;
      var detail = answer && answer.error ? ': ' + answer.error : '';
      throw new Error(status !== 200 ? 'HTTP response code: ' + status + detail : 'publish failed' + detail);
    });
    if (onSuccess || onFail) {
      p.then(function () { if (onSuccess) onSuccess(); },
        function (e) {
          self._log('publish failed: ' + e.message);
          if (onFail) onFail(status, body || e.message);
        });
    }
    return p;
  };

  // newClient(options) -> a started client, or null (the reason is logged), as golongpoll's.
  function newClient(options) {
    var client;
    try {
      client = new Client(options);
    } catch (e) {
      if (typeof console !== 'undefined') console.error('longpoll.newClient: ' + e.message);
      return null;
    }
    if (client.options.subscribeUrl) client.start();
    return client;
  }

  return {
    version: '0.1.0',
    newClient: newClient,
    Client: Client,
    checkOptions: checkOptions,
  };
});
