// Test harness shared by the pages: a client whose events and failures land in window.T,
// for tests/browser/run.mjs to drive with page.evaluate.
window.T = {
  received: [],
  failures: [],
  missed: [],
  client: null,
  // options: longpoll.newClient's, plus stopOnFailure (onFailure returns false)
  start: function (options) {
    var o = Object.assign({}, options);
    var stopOnFailure = o.stopOnFailure === true;
    delete o.stopOnFailure;
    o.onEvent = function (e) { T.received.push(e); };
    o.onFailure = function (msg) { T.failures.push(String(msg)); return !stopOnFailure; };
    o.onMissed = function (e) { T.missed.push(e); };
    T.client = window.longpoll.newClient(o);
    return T.client !== null;
  },
};
