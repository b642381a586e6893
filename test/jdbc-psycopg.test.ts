// JDBC (pgjdbc) and psycopg 3 through the proxy, in transaction and session pooling mode, with the reference
// guardrails on. The point is transaction pooling's transparency to real drivers: pgjdbc switches to named
// server-side statements (S_1, S_2…) after prepareThreshold executions and psycopg prepares with
// prepare=True (_pg3_0…); both must keep working when the next transaction runs on a backend that has
// never seen the statement (the proxy renames statements and prepares them on demand:
// prepared_statement_mode = "track"). The programs park the backend a client used last in other clients'
// open transactions, so "another backend" is certain rather than likely.
//
// Needs /usr/share/java/postgresql.jar and java 11+ (single-file source launch), and psycopg for
// /usr/bin/python3 (Debian: libpostgresql-jdbc-java, python3-psycopg; .ci/run installs them). Without
// them the tests skip.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { direct, startProxy, type TestProxy } from './helpers/proxy.js';

const USER = 'acme.appuser';
const PASSWORD = 'apppass';
const DB = 'shared_db';
const JAR = '/usr/share/java/postgresql.jar';
/** Debian's psycopg is installed for the system Python, not for whatever python3 comes first on PATH. */
const PYTHON = '/usr/bin/python3';

/** A child that outlives this is killed; the test's own deadline is a little longer. */
const CHILD_TIMEOUT_MS = 25_000;
const T = { timeout: 30_000 };

/** Why the JDBC tests cannot run here, or null. */
function jdbcUnavailable(): string | null {
  if (!existsSync(JAR)) return `${JAR} is missing (Debian: apt-get install libpostgresql-jdbc-java)`;
  const v = spawnSync('java', ['-version'], { encoding: 'utf8' });
  if (v.error !== undefined || v.status !== 0) return 'java is missing (Debian: apt-get install default-jre-headless)';
  const major = /version "(\d+)/.exec(v.stderr)?.[1];
  if (major !== undefined && Number(major) < 11) return `java ${major} cannot run a .java source file directly (needs 11+)`;
  return null;
}

/** Why the psycopg tests cannot run here, or null. */
function psycopgUnavailable(): string | null {
  const v = spawnSync(PYTHON, ['-c', 'import psycopg'], { encoding: 'utf8' });
  if (v.error !== undefined) return `${PYTHON} is missing`;
  if (v.status !== 0) return `psycopg 3 is not installed for ${PYTHON} (Debian: apt-get install python3-psycopg)`;
  return null;
}

const noJdbc = jdbcUnavailable();
const noPsycopg = psycopgUnavailable();

interface Output { code: number; stdout: string; stderr: string; lines: string[] }

/** The environment for the driver programs: no PG* variables (libpq reads them) and no pyenv Python paths. */
function childEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (k.startsWith('PG') || k === 'PYTHONPATH' || k === 'PYTHONHOME' || k.startsWith('HELIOS_')) continue;
    env[k] = v;
  }
  return env;
}

/** Runs a driver program to its end (killed after CHILD_TIMEOUT_MS). */
function runProgram(cmd: string, args: string[]): Promise<Output> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env: childEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => {
      stderr += `\n[test] killed after ${CHILD_TIMEOUT_MS} ms`;
      child.kill('SIGKILL');
    }, CHILD_TIMEOUT_MS);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code: code ?? (signal !== null ? 128 : 1), stdout, stderr, lines: stdout.split('\n').filter((l) => l !== '') });
    });
  });
}

/** Everything a failed assertion needs to show. */
function show(r: Output): string {
  return `exit ${r.code}\n--- stdout ---\n${r.stdout}--- stderr (tail) ---\n${r.stderr.slice(-4000)}`;
}

/** The rest of the one output line that starts with `key `. */
function field(r: Output, key: string): string {
  const hits = r.lines.filter((l) => l === key || l.startsWith(`${key} `));
  assert.equal(hits.length, 1, `expected one "${key}" line\n${show(r)}`);
  return hits[0]!.slice(key.length + 1);
}

const customers = (n: number): string[] => Array.from({ length: n }, (_, i) => `acme-customer-${(i % 3) + 1}`);
const range = (from: number, to: number): number[] => Array.from({ length: to - from }, (_, i) => from + i);

let dir = '';
const javaFile = (): string => join(dir, 'PoolingTransparency.java');
const pythonFile = (): string => join(dir, 'psycopg_transparency.py');

before(() => {
  dir = mkdtempSync(join(tmpdir(), 'helios-jdbc-psycopg-'));
  writeFileSync(javaFile(), javaSource());
  writeFileSync(pythonFile(), pythonSource());
});

after(() => {
  if (dir !== '') rmSync(dir, { recursive: true, force: true });
});

for (const mode of ['transaction', 'session'] as const) {
  describe(`JDBC and psycopg through the proxy (${mode} mode)`, () => {
    let p: TestProxy;
    const tables: string[] = [];

    before(async () => {
      p = await startProxy({ mode, guardrails: true });
    });

    after(async () => {
      await p?.close();
      for (const t of tables) await direct(`DROP TABLE IF EXISTS acme.${t}`, DB);
    });

    /** A scratch table in schema acme, dropped (as superuser) before use and after the suite. */
    const scratch = async (name: string): Promise<string> => {
      const table = `${name}_${mode}`;
      tables.push(table);
      await direct(`DROP TABLE IF EXISTS acme.${table}`, DB);
      return table;
    };

    const java = (threshold: number, table: string, scenario: 'main' | 'ddl'): Promise<Output> =>
      runProgram('java', ['-cp', JAR, javaFile(), `jdbc:postgresql://127.0.0.1:${p.port}/${DB}?prepareThreshold=${threshold}`, USER, PASSWORD, table, scenario, mode]);

    const python = (table: string, scenario: 'main' | 'evict' | 'ddl'): Promise<Output> =>
      runProgram(PYTHON, [pythonFile(), '127.0.0.1', String(p.port), USER, PASSWORD, table, scenario, mode]);

    for (const threshold of [5, 1]) {
      test(`JDBC prepareThreshold=${threshold}: named statements across backends, rollback, batch, statement cache, threads`, T, async (t) => {
        if (noJdbc !== null) {
          t.skip(noJdbc);
          return;
        }
        const table = await scratch(`jdbc_t${threshold}`);
        const r = await java(threshold, table, 'main');
        assert.equal(r.code, 0, show(r));
        assert.equal(r.lines.at(-1), 'done', show(r));

        const rows = r.lines.filter((l) => l.startsWith('row '));
        assert.deepEqual(rows.map((l) => l.split(' ')[2]), customers(20), show(r));
        // pgjdbc's own switch: unnamed statements until the threshold-th execution, then Parse S_1 once.
        const firstNamed = rows.findIndex((l) => l.endsWith(' named'));
        assert.equal(firstNamed, threshold - 1, show(r));
        assert.ok(rows.slice(firstNamed).every((l) => l.endsWith(' named')), show(r));
        assert.match(field(r, 'named'), /^S_\d+$/, 'one named statement for the SELECT');
        assert.equal(field(r, 'ok'), '20');
        if (mode === 'transaction') {
          // Every parked round ran on another backend, and the named statement ran on more than one.
          assert.equal(field(r, 'moved'), '10', show(r));
          assert.ok(Number(field(r, 'named-pids')) >= 2, show(r));
        } else {
          assert.equal(field(r, 'pids'), '1', show(r));
        }

        assert.equal(field(r, 'in-tx-count'), '8');
        assert.equal(field(r, 'batch'), '6');
        assert.equal(field(r, 'after-count'), '6 100 105');
        assert.equal(field(r, 'duplicate'), '23505');
        assert.equal(field(r, 'evict-ok'), '72', show(r));
        assert.equal(field(r, 'closed-statements'), 'true', 'pgjdbc closed statements evicted from its cache');
        assert.equal(field(r, 'threads'), '60');

        // What PostgreSQL itself holds: the committed batch only (the ROLLBACKs held).
        const stored = await direct<{ id: number; note: string }>(`SELECT id, note FROM acme.${table} ORDER BY id`, DB);
        assert.deepEqual(stored.map((x) => x.id), range(100, 106));
        assert.ok(stored.every((x) => x.note.startsWith('committed-')), JSON.stringify(stored));
      });
    }

    test('JDBC prepares again when a statement\'s result type changed (ALTER TABLE: "cached plan must not change result type")', T, async (t) => {
      if (noJdbc !== null) {
        t.skip(noJdbc);
        return;
      }
      const table = await scratch('jdbc_ddl');
      const r = await java(5, table, 'ddl');
      assert.equal(r.code, 0, show(r));
      assert.notEqual(field(r, 'named'), '', `the SELECT was server-prepared\n${show(r)}`);
      // In autocommit pgjdbc heals the 0A000 by preparing the statement again and retrying, as it does
      // against PostgreSQL directly.
      assert.deepEqual(r.lines.filter((l) => l.startsWith('after ')), ['after 2 x', 'after 2 x', 'after 2 x'], show(r));
    });

    test('psycopg: prepared statements across backends, commit/rollback, executemany, pipeline, server-side cursor', T, async (t) => {
      if (noPsycopg !== null) {
        t.skip(noPsycopg);
        return;
      }
      const table = await scratch('psycopg');
      const r = await python(table, 'main');
      assert.equal(r.code, 0, show(r));
      assert.equal(r.lines.at(-1), 'done', show(r));

      const rows = r.lines.filter((l) => l.startsWith('row '));
      assert.deepEqual(rows.map((l) => l.split(' ')[2]), customers(20), show(r));
      assert.equal(field(r, 'prepared'), '_pg3_0');
      if (mode === 'transaction') {
        assert.equal(field(r, 'moved'), '10', show(r));
        assert.ok(Number(field(r, 'pids')) >= 2, show(r));
      } else {
        assert.equal(field(r, 'pids'), '1', show(r));
      }
      assert.equal(field(r, 'autocommit'), '3 acme-customer-1');
      assert.equal(field(r, 'in-tx-count'), '12');
      assert.equal(field(r, 'after-count'), '9 100 108');
      assert.equal(field(r, 'duplicate'), '23505');
      assert.equal(field(r, 'named-cursor'), '1:acme-customer-1 2:acme-customer-2 3:acme-customer-3');
      assert.equal(field(r, 'pipeline'), 'acme-customer-1 acme-customer-3 10 acme-widget acme-gadget');
      assert.equal(field(r, 'autocommit-pipeline'), customers(6).join(' '));

      const stored = await direct<{ id: number; note: string }>(`SELECT id, note FROM acme.${table} ORDER BY id`, DB);
      assert.deepEqual(stored.map((x) => x.id), [...range(100, 109), 200]);
      assert.ok(stored.every((x) => !x.note.startsWith('rolled-back-')), JSON.stringify(stored));
    });

    test('psycopg: statements evicted from its prepared cache (DEALLOCATE <name>) and prepared again', T, async (t) => {
      if (noPsycopg !== null) {
        t.skip(noPsycopg);
        return;
      }
      const r = await python('unused', 'evict');
      assert.equal(r.code, 0, show(r));
      const expected = [0, 1].flatMap((rnd) => range(0, 5).map((k) => `evict ${rnd} ${k} acme-customer-${(k % 3) + 1} ${k}`));
      assert.deepEqual(r.lines.filter((l) => l.startsWith('evict ')), expected, show(r));
    });

    test('psycopg: a new client prepares a statement another client prepared before ALTER TABLE changed its result', T, async (t) => {
      if (noPsycopg !== null) {
        t.skip(noPsycopg);
        return;
      }
      const table = await scratch('psycopg_ddl');
      const r = await python(table, 'ddl');
      assert.equal(r.code, 0, show(r));
      assert.equal(field(r, 'first'), '1');
      // Against PostgreSQL a new connection's PREPARE plans the table as it is now.
      assert.deepEqual(r.lines.filter((l) => l.startsWith('fresh ')), ['fresh 1 x', 'fresh 1 x'], show(r));
    });
  });
}

// ── the driver programs ────────────────────────────────────────────────────────────

/** pgjdbc: run as `java -cp postgresql.jar PoolingTransparency.java <url> <user> <password> <table> <main|ddl> <mode>`. */
function javaSource(): string {
  return String.raw`import java.sql.*;
import java.util.*;
import java.util.concurrent.*;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.logging.*;
import java.util.regex.*;

/**
 * pgjdbc through HeliosProxy. Args: url user password table scenario (main | ddl)
 * pool-mode (transaction | session). Prints one result per line; on an
 * SQLException prints "error <SQLSTATE> <message>" and exits 1.
 */
public class PoolingTransparency {
  static void out(String s) {
    System.out.println(s);
    System.out.flush();
  }

  /**
   * The named Parse messages pgjdbc sent, as {name, SQL} (read from its FINEST protocol trace); names are
   * per connection, so several connections each have their own S_1.
   */
  static final List<String[]> parsed = Collections.synchronizedList(new ArrayList<>());
  /** Close(statement) messages pgjdbc sent for statements evicted from its cache. */
  static final AtomicInteger closes = new AtomicInteger();
  static final Pattern PARSE_NAME = Pattern.compile("FE=> Parse\\(stmt=(S_\\d+),query=\"(.*?)\",oids=", Pattern.DOTALL);

  static void traceParses() {
    Logger l = Logger.getLogger("org.postgresql");
    l.setLevel(Level.FINEST);
    l.setUseParentHandlers(false);
    Handler h = new Handler() {
      @Override public void publish(LogRecord r) {
        String m = r.getMessage();
        if (m == null) return;
        if (m.contains("FE=> CloseStatement(")) closes.incrementAndGet();
        if (!m.contains("Parse(stmt=")) return;
        if (r.getParameters() != null) m = java.text.MessageFormat.format(m, r.getParameters());
        Matcher x = PARSE_NAME.matcher(m);
        if (x.find()) parsed.add(new String[] {x.group(1), x.group(2)});
      }
      @Override public void flush() {}
      @Override public void close() {}
    };
    h.setLevel(Level.FINEST);
    l.addHandler(h);
  }

  /** Names of the server-side statements pgjdbc prepared for SQL containing fragment. */
  static Set<String> namesFor(String fragment) {
    Set<String> names = new TreeSet<>();
    synchronized (parsed) {
      for (String[] p : parsed) if (p[1].contains(fragment)) names.add(p[0]);
    }
    return names;
  }

  static String url, user, password;
  static boolean transactionMode;

  /**
   * Opens transactions on holder connections until one of them holds backend pid (transaction pooling
   * gives each open transaction its own backend). Returns the holders now in a transaction.
   */
  static List<Connection> park(int pid, List<Connection> holders) throws SQLException {
    List<Connection> used = new ArrayList<>();
    for (int i = 0; i < 8; i++) {
      if (holders.size() <= i) holders.add(connect(""));
      Connection h = holders.get(i);
      h.setAutoCommit(false);
      used.add(h);
      try (Statement st = h.createStatement(); ResultSet rs = st.executeQuery("SELECT pg_backend_pid()")) {
        rs.next();
        if (rs.getInt(1) == pid) return used;
      }
    }
    throw new IllegalStateException("could not park backend " + pid);
  }

  static Connection connect(String extra) throws SQLException {
    Properties p = new Properties();
    p.setProperty("user", user);
    p.setProperty("password", password);
    return DriverManager.getConnection(url + extra, p);
  }

  public static void main(String[] args) throws Exception {
    url = args[0];
    user = args[1];
    password = args[2];
    String table = args[3];
    transactionMode = args[5].equals("transaction");
    traceParses();
    try {
      if (args[4].equals("ddl")) ddl(table);
      else mainScenario(table);
      out("done");
    } catch (SQLException e) {
      out("error " + e.getSQLState() + " " + e.getMessage());
      e.printStackTrace();
      System.exit(1);
    }
  }

  static void mainScenario(String table) throws Exception {
    try (Connection a = connect("")) {
      try (Statement st = a.createStatement()) {
        st.execute("CREATE TABLE " + table + " (id int PRIMARY KEY, note text NOT NULL)");
      }

      // Autocommit: one PreparedStatement run 20 times, crossing prepareThreshold. In transaction mode, every
      // other round parks the backend a used last in other connections' open transactions, so a's next
      // statement must run on another backend (which may not have the statement yet).
      Set<Integer> pids = new TreeSet<>();
      Set<Integer> namedPids = new TreeSet<>();
      int ok = 0, moved = 0, lastPid = 0;
      List<Connection> holders = new ArrayList<>();
      try (PreparedStatement ps = a.prepareStatement("SELECT customer, pg_backend_pid() FROM orders WHERE id = ?")) {
        for (int i = 0; i < 20; i++) {
          List<Connection> parked = transactionMode && i % 2 == 1 ? park(lastPid, holders) : List.of();
          ps.setInt(1, i % 3 + 1);
          try (ResultSet rs = ps.executeQuery()) {
            if (!rs.next()) throw new IllegalStateException("no row for id " + (i % 3 + 1));
            boolean named = !namesFor("pg_backend_pid() FROM orders").isEmpty();
            int pid = rs.getInt(2);
            out("row " + i + " " + rs.getString(1) + " " + (named ? "named" : "unnamed"));
            pids.add(pid);
            if (named) namedPids.add(pid);
            if (!parked.isEmpty() && pid != lastPid) moved++;
            lastPid = pid;
            ok++;
          }
          for (Connection h : parked) h.commit();
        }
      }
      for (Connection h : holders) h.close();
      out("ok " + ok);
      out("pids " + pids.size());
      out("named-pids " + namedPids.size());
      out("moved " + moved);
      out("named " + String.join(" ", namesFor("pg_backend_pid() FROM orders")));

      // Autocommit off: prepared INSERTs (crossing the threshold inside the transaction), then ROLLBACK.
      a.setAutoCommit(false);
      try (PreparedStatement ins = a.prepareStatement("INSERT INTO " + table + " (id, note) VALUES (?, ?)")) {
        for (int i = 1; i <= 8; i++) {
          ins.setInt(1, i);
          ins.setString(2, "rolled-back-" + i);
          ins.executeUpdate();
        }
      }
      try (PreparedStatement cnt = a.prepareStatement("SELECT count(*) FROM " + table); ResultSet rs = cnt.executeQuery()) {
        rs.next();
        out("in-tx-count " + rs.getInt(1));
      }
      a.rollback();
      // A committed batch of the same INSERT.
      try (PreparedStatement ins = a.prepareStatement("INSERT INTO " + table + " (id, note) VALUES (?, ?)")) {
        for (int i = 100; i < 106; i++) {
          ins.setInt(1, i);
          ins.setString(2, "committed-" + i);
          ins.addBatch();
        }
        out("batch " + ins.executeBatch().length);
      }
      a.commit();
      a.setAutoCommit(true);
      try (PreparedStatement cnt = a.prepareStatement("SELECT count(*), min(id), max(id) FROM " + table); ResultSet rs = cnt.executeQuery()) {
        rs.next();
        out("after-count " + rs.getInt(1) + " " + rs.getInt(2) + " " + rs.getInt(3));
      }
      // An error inside a transaction, then a rollback: the connection goes on working.
      a.setAutoCommit(false);
      try (PreparedStatement ins = a.prepareStatement("INSERT INTO " + table + " (id, note) VALUES (?, ?)")) {
        ins.setInt(1, 100);
        ins.setString(2, "duplicate");
        ins.executeUpdate();
        out("duplicate accepted");
      } catch (SQLException e) {
        out("duplicate " + e.getSQLState());
      }
      a.rollback();
      a.setAutoCommit(true);
    }

    // A statement cache of 2: pgjdbc closes evicted server statements (Close S_n) and prepares them again.
    int evictOk = 0;
    try (Connection c = connect("&preparedStatementCacheQueries=2")) {
      for (int round = 0; round < 2; round++) {
        for (int k = 0; k < 6; k++) {
          try (PreparedStatement ps = c.prepareStatement("SELECT customer, " + k + " AS k FROM orders WHERE id = ?")) {
            for (int i = 0; i < 6; i++) {
              ps.setInt(1, i % 3 + 1);
              try (ResultSet rs = ps.executeQuery()) {
                if (rs.next() && rs.getString(1).equals("acme-customer-" + (i % 3 + 1)) && rs.getInt(2) == k) evictOk++;
              }
            }
          }
        }
      }
    }
    out("evict-ok " + evictOk);
    out("closed-statements " + (closes.get() > 0));

    // Several threads, each with its own connection, running the same prepared query at once.
    int threads = 4;
    ExecutorService pool = Executors.newFixedThreadPool(threads);
    List<Future<Integer>> fs = new ArrayList<>();
    for (int t = 0; t < threads; t++) {
      fs.add(pool.submit(() -> {
        int n = 0;
        try (Connection c = connect(""); PreparedStatement ps = c.prepareStatement("SELECT customer FROM orders WHERE id = ?")) {
          for (int i = 0; i < 15; i++) {
            ps.setInt(1, i % 3 + 1);
            try (ResultSet rs = ps.executeQuery()) {
              if (rs.next() && rs.getString(1).equals("acme-customer-" + (i % 3 + 1))) n++;
            }
          }
        }
        return n;
      }));
    }
    int total = 0;
    try {
      for (Future<Integer> f : fs) total += f.get();
    } catch (ExecutionException e) {
      if (e.getCause() instanceof SQLException) throw (SQLException) e.getCause();
      throw e;
    } finally {
      pool.shutdown();
    }
    out("threads " + total);
  }

  /**
   * A server-prepared SELECT * whose table gains a column: PostgreSQL answers "cached plan must not change
   * result type" (0A000) and pgjdbc, in autocommit, prepares the statement again and retries.
   */
  static void ddl(String table) throws Exception {
    try (Connection a = connect("")) {
      try (Statement st = a.createStatement()) {
        st.execute("CREATE TABLE " + table + " (id int)");
        st.execute("INSERT INTO " + table + " VALUES (1)");
      }
      try (PreparedStatement ps = a.prepareStatement("SELECT * FROM " + table)) {
        for (int i = 0; i < 6; i++) {
          try (ResultSet rs = ps.executeQuery()) {
            rs.next();
          }
        }
        out("named " + String.join(" ", namesFor("SELECT * FROM " + table)));
        try (Statement st = a.createStatement()) {
          st.execute("ALTER TABLE " + table + " ADD COLUMN note text DEFAULT 'x'");
        }
        for (int i = 0; i < 3; i++) {
          try (ResultSet rs = ps.executeQuery()) {
            rs.next();
            out("after " + rs.getMetaData().getColumnCount() + " " + rs.getString(2));
          } catch (SQLException e) {
            out("after error " + e.getSQLState() + " " + e.getMessage().split("\n")[0]);
          }
        }
      }
    }
  }
}
`;
}

/** psycopg 3: run as `/usr/bin/python3 psycopg_transparency.py <host> <port> <user> <password> <table> <main|evict|ddl> <mode>`. */
function pythonSource(): string {
  return String.raw`# psycopg 3 through HeliosProxy. Args: host port user password table scenario (main | evict | ddl) pool-mode.
# Prints one result per line.
import sys

import psycopg

host, port, user, password, table, scenario, pool_mode = sys.argv[1], int(sys.argv[2]), *sys.argv[3:8]


def connect(**kw):
    return psycopg.connect(host=host, port=port, user=user, password=password, dbname='shared_db', connect_timeout=10, **kw)


def out(*words):
    print(*words, flush=True)


def park(pid, holders):
    """Opens transactions on holder connections until one holds backend pid; returns those in a transaction."""
    used = []
    for i in range(8):
        if len(holders) <= i:
            holders.append(connect())
        h = holders[i]
        used.append(h)
        if h.execute('SELECT pg_backend_pid()').fetchone()[0] == pid:
            return used
    raise RuntimeError(f'could not park backend {pid}')


def main():
    with connect(autocommit=True) as a:
        a.execute(f'CREATE TABLE {table} (id int PRIMARY KEY, note text NOT NULL)')
        # Autocommit, server-side prepared (prepare=True: Parse _pg3_0 once, then Bind/Execute only). In
        # transaction mode every other round parks the backend a used last in other connections' open
        # transactions, so a's next statement must run on another backend.
        holders = []
        pids, moved, last = set(), 0, 0
        for i in range(20):
            parked = park(last, holders) if pool_mode == 'transaction' and i % 2 == 1 else []
            customer, pid = a.execute('SELECT customer, pg_backend_pid() FROM orders WHERE id = %s', (i % 3 + 1,), prepare=True).fetchone()
            out('row', i, customer)
            pids.add(pid)
            if parked and pid != last:
                moved += 1
            last = pid
            for h in parked:
                h.commit()
        for h in holders:
            h.close()
        out('pids', len(pids))
        out('moved', moved)
        out('prepared', *sorted(n.decode() for n in a._prepared._names.values()))
        out('autocommit', *a.execute('SELECT count(*), min(customer) FROM orders').fetchone())

    with connect() as c:
        # A transaction rolled back: prepared INSERTs and an executemany. psycopg follows its ROLLBACK with
        # DEALLOCATE ALL (it had prepared statements), then prepares again.
        for i in range(1, 9):
            c.execute(f'INSERT INTO {table} VALUES (%s, %s)', (i, f'rolled-back-{i}'), prepare=True)
        with c.cursor() as cur:
            cur.executemany(f'INSERT INTO {table} VALUES (%s, %s)', [(i, f'rolled-back-{i}') for i in range(9, 13)])
        out('in-tx-count', c.execute(f'SELECT count(*) FROM {table}').fetchone()[0])
        c.rollback()
        # Committed: executemany, then the prepared INSERT again (after DEALLOCATE ALL).
        with c.cursor() as cur:
            cur.executemany(f'INSERT INTO {table} VALUES (%s, %s)', [(i, f'committed-{i}') for i in range(100, 106)])
        for i in range(106, 109):
            c.execute(f'INSERT INTO {table} VALUES (%s, %s)', (i, f'committed-{i}'), prepare=True)
        c.commit()
        out('after-count', *c.execute(f'SELECT count(*), min(id), max(id) FROM {table}').fetchone())
        c.commit()
        # An error inside a transaction, then rollback: the connection goes on working.
        try:
            c.execute(f'INSERT INTO {table} VALUES (%s, %s)', (100, 'duplicate'), prepare=True)
            out('duplicate accepted')
        except psycopg.Error as e:
            out('duplicate', e.sqlstate)
        c.rollback()
        # A server-side cursor (DECLARE/FETCH) inside a transaction, fetched two rows at a time.
        with c.transaction():
            with c.cursor(name='c') as sc:
                sc.itersize = 2
                sc.execute('SELECT id, customer FROM orders WHERE id <= %s ORDER BY id', (3,))
                out('named-cursor', *[f'{i}:{customer}' for i, customer in sc])
        # Pipeline mode: several queries, prepared ones among them, one Sync at the end.
        with c.pipeline():
            c1 = c.execute('SELECT customer FROM orders WHERE id = %s', (1,), prepare=True)
            c.execute(f'INSERT INTO {table} VALUES (%s, %s)', (200, 'pipelined'))
            c3 = c.execute('SELECT customer FROM orders WHERE id = %s', (3,), prepare=True)
            c4 = c.execute(f'SELECT count(*) FROM {table}')
            c5 = c.execute('SELECT name FROM products ORDER BY id')
        out('pipeline', c1.fetchone()[0], c3.fetchone()[0], c4.fetchone()[0], *[r[0] for r in c5.fetchall()])
        c.commit()

    with connect(autocommit=True) as d:
        # Autocommit pipeline: each statement its own transaction, prepared ones included.
        with d.pipeline():
            curs = [d.execute('SELECT customer FROM orders WHERE id = %s', (i % 3 + 1,), prepare=True) for i in range(6)]
        out('autocommit-pipeline', *[cur.fetchone()[0] for cur in curs])


def evict():
    # psycopg keeps prepared_max statements (100 by default) and sends DEALLOCATE <name> for the oldest.
    with connect(autocommit=True) as a:
        a.prepared_max = 2
        for rnd in range(2):
            for k in range(5):
                try:
                    row = a.execute(f'SELECT customer, {k} FROM orders WHERE id = %s', (k % 3 + 1,), prepare=True).fetchone()
                    out('evict', rnd, k, *row)
                except psycopg.Error as e:
                    out('evict', rnd, k, 'error', e.sqlstate, str(e).splitlines()[0])


def ddl():
    # A statement prepared by one client, then its table gains a column; a new client prepares the same SQL.
    with connect(autocommit=True) as a:
        a.execute(f'CREATE TABLE {table} (id int)')
        a.execute(f'INSERT INTO {table} VALUES (1)')
        out('first', *a.execute(f'SELECT * FROM {table}', prepare=True).fetchone())
        a.execute(f"ALTER TABLE {table} ADD COLUMN note text DEFAULT 'x'")
    with connect(autocommit=True) as b:
        for i in range(2):
            try:
                out('fresh', *b.execute(f'SELECT * FROM {table}', prepare=True).fetchone())
            except psycopg.Error as e:
                out('fresh', 'error', e.sqlstate, str(e).splitlines()[0])


{'main': main, 'evict': evict, 'ddl': ddl}[scenario]()
out('done')
`;
}
