// admin/ owns what operators can see. This file is the status page at `/`: plain HTML and a few lines
// of script that poll the JSON routes, so it needs no build step and no assets.
export const STATUS_PAGE = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>HeliosProxy</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 2rem; color: #1d2330; }
  h1 { font-size: 1.3rem; margin: 0 0 .2rem; }
  .sub { color: #667; margin-bottom: 1.2rem; }
  table { border-collapse: collapse; min-width: 48rem; }
  th, td { text-align: right; padding: .35rem .7rem; border-bottom: 1px solid #e3e6ec; }
  th:first-child, td:first-child { text-align: left; }
  th { background: #f5f6f9; font-weight: 600; }
  .bad { color: #b3261e; }
</style>
</head>
<body>
<h1>HeliosProxy</h1>
<div class="sub" id="summary">loading…</div>
<table>
  <thead><tr><th>tenant</th><th>isolation</th><th>clients</th><th>backends</th><th>qps</th><th>queries</th><th>rejections</th><th>p95 ms</th></tr></thead>
  <tbody id="tenants"></tbody>
</table>
<script>
async function refresh() {
  try {
    const [g, t] = await Promise.all([fetch('metrics').then(r => r.json()), fetch('tenants').then(r => r.json())]);
    document.getElementById('summary').textContent =
      'up ' + g.uptime_secs + ' s · ' + g.clients + ' clients · backends ' + g.backends.active + ' active / ' + g.backends.idle + ' idle · ' + g.qps + ' qps';
    const rows = await Promise.all(t.tenants.map(async (x) => {
      const m = await fetch('tenants/' + encodeURIComponent(x.id) + '/metrics').then(r => r.json());
      const iso = x.isolation.strategy === 'schema' ? x.isolation.database + '.' + x.isolation.schema : x.isolation.database;
      const cells = [x.id, iso, m.clients, m.backends_in_use, m.qps, m.queries, m.rejections.total, m.latency.p95_ms ?? '–'];
      return '<tr>' + cells.map((c, i) => '<td' + (i === 6 && c > 0 ? ' class="bad"' : '') + '>' + String(c).replace(/[<&]/g, '') + '</td>').join('') + '</tr>';
    }));
    document.getElementById('tenants').innerHTML = rows.join('');
  } catch (e) {
    document.getElementById('summary').textContent = 'cannot reach the admin API: ' + e;
  }
}
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
`;
