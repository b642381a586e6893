// Runner behind `npm test`: one throwaway PostgreSQL for the whole suite (initdb per file would
// dominate run time), handed to the node:test child through HELIOS_TEST_PG_* env vars.
import { spawn } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { constants } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { PostgresNotFoundError, seedScenario, startLocalPostgres } from '../src/localpg/index.js';

const root = fileURLToPath(new URL('..', import.meta.url));
const TIMEOUT_MS = 15 * 60_000;
let child: ReturnType<typeof spawn> | undefined;
let interrupted: NodeJS.Signals | undefined;

const signalExit = (sig: NodeJS.Signals): number => 128 + (constants.signals[sig] ?? 1);

// The child runs in its own process group (detached) so it and every per-file subprocess can be
// signalled together; a second Ctrl-C gives up on a graceful shutdown.
function killChild(sig: NodeJS.Signals): void {
  if (child?.pid && child.exitCode === null) {
    try { process.kill(-child.pid, sig); } catch { /* already gone */ }
  }
}
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.on(sig, () => {
    if (interrupted) process.exit(signalExit(sig));
    interrupted = sig;
    killChild(sig);
  });
}

function testFiles(filters: string[]): string[] {
  return readdirSync(join(root, 'test'), { recursive: true, encoding: 'utf8' })
    .map((f) => join('test', f))
    .filter((f) => f.endsWith('.test.ts') && (filters.length === 0 || filters.some((x) => f.includes(x))))
    .sort();
}

function runTests(files: string[], env: NodeJS.ProcessEnv): Promise<number> {
  return new Promise((resolve, reject) => {
    // HELIOS_TEST_NAME: only the tests whose name matches this regular expression (node --test-name-pattern).
    const only = process.env.HELIOS_TEST_NAME ? [`--test-name-pattern=${process.env.HELIOS_TEST_NAME}`] : [];
    const args = ['--import', 'tsx', '--test', '--test-concurrency=1', '--test-reporter=spec', ...only, ...files];
    child = spawn(process.execPath, args, { cwd: root, env, stdio: 'inherit', detached: true });
    const timer = setTimeout(() => {
      console.error(`\n[test/run] tests exceeded ${TIMEOUT_MS / 60_000} minutes, killing them`);
      killChild('SIGTERM');
      setTimeout(() => killChild('SIGKILL'), 10_000).unref();
    }, TIMEOUT_MS);
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      resolve(code ?? signalExit(signal ?? 'SIGTERM'));
    });
  });
}

async function main(): Promise<number> {
  const filters = process.argv.slice(2);
  const files = testFiles(filters);
  if (files.length === 0) {
    console.error(`[test/run] no test files match: ${filters.join(' ')}`);
    return 1;
  }
  const pg = await startLocalPostgres({ log: (line) => console.log(`[localpg] ${line}`) });
  try {
    await seedScenario(pg);
    if (interrupted) return signalExit(interrupted);
    return await runTests(files, {
      ...process.env,
      HELIOS_TEST_PG_HOST: pg.host,
      HELIOS_TEST_PG_PORT: String(pg.port),
      HELIOS_TEST_PG_SUPERUSER: pg.superuser,
      HELIOS_TEST_PG_PASSWORD: pg.superuserPassword,
      HELIOS_TEST_PG_BINDIR: pg.binDir,
      HELIOS_TEST_PG_SOCKETDIR: pg.socketDir,
    });
  } finally {
    await pg.stop();
    console.log('[localpg] stopped');
  }
}

main().then(
  (code) => process.exit(interrupted ? signalExit(interrupted) : code),
  (err: unknown) => {
    console.error(err instanceof PostgresNotFoundError ? err.message : err);
    process.exit(1);
  },
);
