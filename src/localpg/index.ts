// Throwaway PostgreSQL clusters for the demo command, the tests and the benchmark, so none of
// them depends on (or can damage) a real server. Node built-ins only: this ships in dist/.
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chownSync, existsSync, mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, dirname, join } from 'node:path';
import { freePort, isExecutable, run, shq, which, type RunResult } from './proc.js';

export interface LocalPostgres {
  host: string;
  port: number;
  socketDir: string;
  superuser: string;
  superuserPassword: string;
  binDir: string;
  dataDir: string;
  version: string;
  psql(sql: string, opts?: { database?: string; user?: string; password?: string }): Promise<string>;
  stop(): Promise<void>;
}

export interface StartOptions { port?: number; settings?: Record<string, string>; log?: (line: string) => void }

export const SCENARIO = { role: 'appuser', password: 'apppass' } as const;

const INSTALL_HINT = [
  'PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found.',
  'Searched HELIOS_PG_BINDIR, PATH, `pg_config --bindir`, /usr/lib/postgresql/*/bin and /usr/local/pgsql/bin.',
  'Install PostgreSQL, for example:',
  '  Debian/Ubuntu:  apt-get install postgresql',
  '  Fedora/RHEL:    dnf install postgresql-server',
  '  Alpine:         apk add postgresql',
  '  macOS:          brew install postgresql@16',
  'or set HELIOS_PG_BINDIR to the directory that contains initdb, pg_ctl and postgres.',
].join('\n');

export class PostgresNotFoundError extends Error {
  constructor(message: string = INSTALL_HINT) {
    super(message);
    this.name = 'PostgresNotFoundError';
  }
}

const SERVER_BINARIES = ['initdb', 'pg_ctl', 'postgres'];
const hasServerBinaries = (dir: string): boolean => SERVER_BINARIES.every((b) => isExecutable(join(dir, b)));

/** Follows symlinked binaries (e.g. /usr/local/bin/initdb) back to their install so psql and share/ match. */
function usableDir(dir: string): string | undefined {
  if (!hasServerBinaries(dir)) return undefined;
  try {
    const real = dirname(realpathSync(join(dir, 'initdb')));
    if (hasServerBinaries(real)) return real;
  } catch {
    // unreadable link: the directory itself still qualifies
  }
  return dir;
}

function* candidateDirs(): Generator<string> {
  yield* (process.env.PATH ?? '').split(delimiter).filter(Boolean);
  try {
    yield execFileSync('pg_config', ['--bindir'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: 5000 }).trim();
  } catch {
    // no pg_config: keep looking
  }
  const debianRoot = '/usr/lib/postgresql';
  if (existsSync(debianRoot)) {
    const versions = readdirSync(debianRoot).sort((a, b) => b.localeCompare(a, 'en', { numeric: true }));
    yield* versions.map((v) => join(debianRoot, v, 'bin'));
  }
  yield '/usr/local/pgsql/bin';
}

export function findPostgresBinDir(): string {
  const forced = process.env.HELIOS_PG_BINDIR;
  if (forced) {
    if (hasServerBinaries(forced)) return forced;
    throw new PostgresNotFoundError(`HELIOS_PG_BINDIR=${forced} does not contain executable initdb, pg_ctl and postgres.\n\n${INSTALL_HINT}`);
  }
  for (const dir of candidateDirs()) {
    const found = usableDir(dir);
    if (found) return found;
  }
  throw new PostgresNotFoundError();
}

/** Inherited PG* variables (PGHOST, PGSERVICE, PGSSLMODE...) would silently redirect or alter our connections. */
function cleanEnv(extra: Record<string, string | undefined> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('PG')) env[k] = v;
  for (const [k, v] of Object.entries(extra)) if (v !== undefined) env[k] = v;
  return env;
}

type Runner = (cmd: string, args: string[]) => Promise<RunResult>;

/** PostgreSQL refuses to run as root, so as root the server tools run as the `postgres` OS user. */
async function serverRunner(tmp: string): Promise<{ runner: Runner; owner?: { uid: number; gid: number } }> {
  const env = cleanEnv({ LC_ALL: 'C' });
  if (process.getuid?.() !== 0) return { runner: (cmd, args) => run(cmd, args, { env, cwd: tmp }) };
  if ((await run('id', ['-u', 'postgres'])).code !== 0) {
    const add = await run(which('useradd') ?? 'useradd', ['--system', '--no-create-home', 'postgres']);
    if (add.code !== 0) throw new Error(`could not create the postgres OS user: ${add.stderr.trim()}`);
  }
  const uid = Number((await run('id', ['-u', 'postgres'])).stdout.trim());
  const gid = Number((await run('id', ['-g', 'postgres'])).stdout.trim());
  const runuser = which('runuser');
  const runner: Runner = runuser
    ? (cmd, args) => run(runuser, ['-u', 'postgres', '--', cmd, ...args], { env, cwd: tmp })
    : (cmd, args) => run('su', ['postgres', '-s', '/bin/sh', '-c', `exec ${[cmd, ...args].map(shq).join(' ')}`], { env, cwd: tmp });
  return { runner, owner: { uid, gid } };
}

const describe = (r: RunResult): string => (r.stderr.trim() || r.stdout.trim() || `exit code ${r.code}`);

function tail(file: string, lines = 30): string {
  try {
    return readFileSync(file, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return '(no server log)';
  }
}

/** A postmaster.pid can outlive a crashed server; only a live pid means there is something to stop. */
function postmasterAlive(dataDir: string): boolean {
  let pid: number;
  try {
    pid = Number(readFileSync(join(dataDir, 'postmaster.pid'), 'utf8').split('\n')[0]);
  } catch {
    return false;
  }
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export async function startLocalPostgres(opts: StartOptions = {}): Promise<LocalPostgres> {
  const log = opts.log ?? (() => undefined);
  const binDir = findPostgresBinDir();
  const bin = (name: string): string => join(binDir, name);
  const psqlPath = isExecutable(bin('psql')) ? bin('psql') : 'psql';
  const tmp = mkdtempSync(join(tmpdir(), 'heliospg-'));
  const dataDir = join(tmp, 'data');
  const logFile = join(tmp, 'server.log');
  const pwFile = join(tmp, 'pwfile');
  const superuser = 'postgres';
  const superuserPassword = randomBytes(18).toString('base64url');

  let stopping: Promise<void> | undefined;
  let runner: Runner = () => Promise.reject(new Error('not initialised'));
  const stop = (): Promise<void> =>
    (stopping ??= (async () => {
      for (const mode of ['fast', 'immediate']) {
        if (!postmasterAlive(dataDir)) break;
        await runner(bin('pg_ctl'), ['stop', '-D', dataDir, '-m', mode, '-w', '-t', '60']);
      }
      if (postmasterAlive(dataDir)) throw new Error(`could not stop PostgreSQL in ${dataDir}\n${tail(logFile)}`);
      rmSync(tmp, { recursive: true, force: true });
    })());

  try {
    const server = await serverRunner(tmp);
    runner = server.runner;
    writeFileSync(pwFile, `${superuserPassword}\n`, { mode: 0o600 });
    if (server.owner) for (const p of [tmp, pwFile]) chownSync(p, server.owner.uid, server.owner.gid);

    const versionOut = await run(bin('postgres'), ['--version']);
    const version = /\(PostgreSQL\)\s+(\S+)/.exec(versionOut.stdout)?.[1] ?? versionOut.stdout.trim();
    const port = opts.port ?? (await freePort());

    log(`initdb PostgreSQL ${version} (${binDir}) into ${dataDir}`);
    const init = await runner(bin('initdb'), [
      '-D', dataDir, '-A', 'scram-sha-256', '--auth-local=scram-sha-256', '--auth-host=scram-sha-256',
      '-U', superuser, `--pwfile=${pwFile}`, '-E', 'UTF8', '--locale=C', '--no-sync',
    ]);
    if (init.code !== 0) throw new Error(`initdb failed: ${describe(init)}`);
    rmSync(pwFile, { force: true });

    // Durability is pointless for a throwaway cluster; max_connections leaves room for pool tests.
    const settings: Record<string, string> = {
      listen_addresses: '127.0.0.1', max_connections: '300', fsync: 'off', synchronous_commit: 'off',
      full_page_writes: 'off', shared_buffers: '128MB', password_encryption: 'scram-sha-256', ...opts.settings,
    };
    // pg_ctl hands -o to /bin/sh, hence the quoting.
    const serverOpts = ['-p', String(port), '-k', shq(tmp), ...Object.entries(settings).flatMap(([k, v]) => ['-c', shq(`${k}=${v}`)])];
    log(`starting PostgreSQL on 127.0.0.1:${port}`);
    const start = await runner(bin('pg_ctl'), ['start', '-w', '-t', '60', '-D', dataDir, '-l', logFile, '-o', serverOpts.join(' ')]);
    if (start.code !== 0) throw new Error(`pg_ctl start failed: ${describe(start)}\n--- server log tail ---\n${tail(logFile)}`);

    const pg: LocalPostgres = {
      host: '127.0.0.1', port, socketDir: tmp, superuser, superuserPassword, binDir, dataDir, version, stop,
      async psql(sql, o = {}) {
        const user = o.user ?? superuser;
        const password = o.password ?? (user === superuser ? superuserPassword : undefined);
        const args = ['-X', '-q', '-At', '-w', '-v', 'ON_ERROR_STOP=1', '-h', '127.0.0.1', '-p', String(port), '-U', user, '-d', o.database ?? 'postgres', '-f', '-'];
        // Fed through stdin with -f so multi-statement scripts (CREATE DATABASE, \gexec) work like a file.
        const r = await run(psqlPath, args, { env: cleanEnv({ PGPASSWORD: password, PGCONNECT_TIMEOUT: '10' }), input: sql });
        if (r.code !== 0) throw new Error(`psql (${user}@${o.database ?? 'postgres'}) failed: ${describe(r)}`);
        return r.stdout.replace(/\n$/, '');
      },
    };
    log(`PostgreSQL ${version} ready on 127.0.0.1:${port} (socket dir ${tmp})`);
    return pg;
  } catch (err) {
    // stop() also removes the temp dir, unless a server it could not stop still lives in it.
    await stop().catch(() => undefined);
    throw err;
  }
}

function tenantTables(schema: string, customers: string[], products: string[]): string {
  const orders = customers.map((c, i) => `('${c}', ${(i + 1) * 10}.50)`).join(', ');
  const items = products.map((p, i) => `('${p}', ${(i + 1) * 5}.25)`).join(', ');
  return `
CREATE TABLE IF NOT EXISTS ${schema}.orders (id serial PRIMARY KEY, customer text NOT NULL, amount numeric(10,2) NOT NULL, created_at timestamptz DEFAULT now());
CREATE TABLE IF NOT EXISTS ${schema}.products (id serial PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL);
INSERT INTO ${schema}.orders (customer, amount) SELECT * FROM (VALUES ${orders}) v WHERE NOT EXISTS (SELECT FROM ${schema}.orders);
INSERT INTO ${schema}.products (name, price) SELECT * FROM (VALUES ${items}) v WHERE NOT EXISTS (SELECT FROM ${schema}.products);
`;
}

/**
 * The demo/test scenario: schema-per-tenant (acme, newclient in shared_db) next to database-per-tenant
 * (widgetco_db), with rows named after their tenant so a leak across tenants is visible in results.
 * Tenant objects are created under SET ROLE so appuser owns them (and their sequences) outright.
 */
export async function seedScenario(pg: LocalPostgres): Promise<void> {
  const { role, password } = SCENARIO;
  await pg.psql(`
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '${role}') THEN
    CREATE ROLE ${role} LOGIN PASSWORD '${password}';
  END IF;
  -- heliosauth: superuser that the proxy's auth_query tests use to look up other roles' SCRAM secrets.
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'heliosauth') THEN
    CREATE ROLE heliosauth LOGIN SUPERUSER PASSWORD 'heliosauth';
  END IF;
END $$;
SELECT 'CREATE DATABASE shared_db OWNER ${pg.superuser}' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'shared_db') \\gexec
SELECT 'CREATE DATABASE widgetco_db OWNER ${role}' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'widgetco_db') \\gexec
`);
  await pg.psql(`
CREATE SCHEMA IF NOT EXISTS acme AUTHORIZATION ${role};
CREATE SCHEMA IF NOT EXISTS newclient AUTHORIZATION ${role};
CREATE TABLE IF NOT EXISTS public.plans (id int PRIMARY KEY, name text);
INSERT INTO public.plans VALUES (1, 'free'), (2, 'pro') ON CONFLICT DO NOTHING;
GRANT USAGE ON SCHEMA public TO ${role};
GRANT SELECT ON public.plans TO ${role};
SET ROLE ${role};
${tenantTables('acme', ['acme-customer-1', 'acme-customer-2', 'acme-customer-3'], ['acme-widget', 'acme-gadget'])}
${tenantTables('newclient', ['newclient-customer-1', 'newclient-customer-2'], ['newclient-thing'])}
`, { database: 'shared_db' });
  await pg.psql(`SET ROLE ${role};\n${tenantTables('public', ['widgetco-customer-1', 'widgetco-customer-2'], ['widgetco-sprocket'])}`, { database: 'widgetco_db' });
}
