// The demo page's logic: one longpoll.js client per watched set of categories, a publish form,
// and two views of what arrives (a readable list and the raw JSON). Text is only ever set with
// textContent, so whatever anyone publishes is shown, never run.
(function () {
  'use strict';

  var MAX_SHOWN = 200; // list items and raw lines kept on the page
  var $ = function (id) { return document.getElementById(id); };

  var client = null;
  var count = 0;
  var rawLines = [];

  // ?category=a,b picks what to watch on load (examples/stressor.lua links to ?category=stress).
  var params = new URLSearchParams(location.search);
  if (params.get('category')) {
    $('categories').value = params.get('category');
    $('publish-category').value = parseCategories(params.get('category'))[0] || 'chat';
  }

  function parseCategories(text) {
    var seen = {};
    return text.split(',').map(function (s) { return s.trim(); })
      .filter(function (s) { return s && !seen[s] && (seen[s] = true); });
  }

  function setStatus(state, text) {
    var el = $('status');
    el.dataset.state = state;
    el.textContent = text;
  }

  function clock(ms) {
    var d = new Date(ms);
    var pad = function (n) { return String(n).padStart(2, '0'); };
    return pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
  }

  // A chat message is { from, text }; anything else is shown as JSON.
  function describe(data) {
    if (data && typeof data === 'object' && !Array.isArray(data) && typeof data.text === 'string') {
      return { from: typeof data.from === 'string' ? data.from : '', text: data.text };
    }
    if (typeof data === 'string') return { from: '', text: data };
    return { from: '', text: JSON.stringify(data) };
  }

  function span(cls, text) {
    var s = document.createElement('span');
    s.className = cls;
    s.textContent = text;
    return s;
  }

  function trim(list) {
    while (list.children.length > MAX_SHOWN) list.removeChild(list.firstChild);
  }

  function show(event) {
    count++;
    $('count').textContent = String(count);
    $('empty').hidden = true;
    var d = describe(event.data);
    var li = document.createElement('li');
    li.className = 'event';
    li.dataset.category = event.category;
    li.dataset.id = event.id;
    li.appendChild(span('time', clock(event.timestamp)));
    li.appendChild(span('category', event.category));
    if (d.from) li.appendChild(span('from', d.from));
    li.appendChild(span('text', d.text));
    var list = $('events');
    list.appendChild(li);
    trim(list);
    li.scrollIntoView({ block: 'nearest' });
    rawLines.unshift(JSON.stringify(event));
    if (rawLines.length > MAX_SHOWN) rawLines.length = MAX_SHOWN;
    $('raw').textContent = rawLines.join('\n');
  }

  function note(text) {
    var li = document.createElement('li');
    li.className = 'note';
    li.textContent = text;
    $('events').appendChild(li);
  }

  function updateHelp(categories) {
    var origin = location.origin;
    var category = $('publish-category').value.trim() || categories[0];
    var body = JSON.stringify({ category: category, data: { from: 'shell', text: 'hello' } });
    $('curl').textContent =
      "curl -d '" + body + "' " + origin + '/publish\n' +
      "curl '" + origin + '/events?' + categories.map(function (c) {
        return 'category=' + encodeURIComponent(c);
      }).join('&') + "&timeout=30&since_time=0'";
    $('events-link').href = '/events?' + categories.map(function (c) {
      return 'category=' + encodeURIComponent(c);
    }).join('&') + '&timeout=30&since_time=0';
  }

  // Starts watching: a fresh client from the start of what the server still buffers.
  function watch(categories) {
    if (client) client.stop();
    count = 0;
    rawLines = [];
    $('count').textContent = '0';
    $('events').textContent = '';
    $('raw').textContent = '';
    $('empty').hidden = false;
    $('watching').textContent = categories.join(', ');
    updateHelp(categories);
    client = longpoll.newClient({
      subscribeUrl: '/events',
      publishUrl: '/publish',
      category: categories.length === 1 ? categories[0] : categories,
      sinceTime: 0, // everything still buffered, then new events
      pollTimeoutSeconds: 30,
      reattemptWaitSeconds: 2,
      onEvent: function (event) {
        setStatus('live', 'watching ' + categories.join(', '));
        show(event);
      },
      onMissed: function () {
        note('Older events were dropped by the server before this page saw them.');
      },
      onFailure: function (message) {
        setStatus('offline', 'offline (' + message + '); retrying every 2 s');
        return true;
      },
    });
    if (!client) {
      setStatus('offline', 'could not start the client: see the console');
      return;
    }
    setStatus('live', 'watching ' + categories.join(', '));
  }

  $('watch-form').addEventListener('submit', function (e) {
    e.preventDefault();
    var categories = parseCategories($('categories').value);
    if (categories.length === 0) return;
    $('categories').value = categories.join(',');
    if (categories.indexOf($('publish-category').value.trim()) < 0) {
      $('publish-category').value = categories[0];
    }
    watch(categories);
  });

  $('publish-category').addEventListener('input', function () {
    updateHelp(parseCategories($('categories').value));
  });

  $('publish-form').addEventListener('submit', function (e) {
    e.preventDefault();
    var category = $('publish-category').value.trim();
    var text = $('message').value;
    if (!client || !category || !text) return;
    var name = $('name').value.trim();
    var data = name ? { from: name, text: text } : { text: text };
    var button = $('publish');
    var error = $('publish-error');
    button.disabled = true;
    client.publish(category, data).then(function () {
      error.hidden = true;
      $('message').value = '';
    }, function (err) {
      error.hidden = false;
      error.textContent = 'publish failed: ' + err.message;
    }).finally(function () {
      button.disabled = false;
      $('message').focus();
    });
  });

  window.demo = { watch: watch, get client() { return client; } };
  watch(parseCategories($('categories').value));
})();
