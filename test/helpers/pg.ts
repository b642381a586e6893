// Test-side view of the one cluster test/run.ts starts, so test files never spin up their own
// and all agree on how to reach it (coordinates arrive through HELIOS_TEST_PG_* env vars).
import { join } from 'node:path';
import { isExecutable, run, type RunResult } from '../../src/localpg/proc.js';

export { freePort } from '../../src/localpg/proc.js';

export interface TestPg { host: string; port: number; superuser: string; password: string; binDir: string; socketDir: string }

export function testPg(): TestPg {
  const env = (name: string): string => {
    const v = process.env[`HELIOS_TEST_PG_${name}`];
    if (!v) throw new Error(`HELIOS_TEST_PG_${name} is not set: run tests through test/run.ts (npm test, or npx tsx test/run.ts <filter>), which starts the test PostgreSQL`);
    return v;
  };
  return { host: env('HOST'), port: Number(env('PORT')), superuser: env('SUPERUSER'), password: env('PASSWORD'), binDir: env('BINDIR'), socketDir: env('SOCKETDIR') };
}

export function psqlBin(): string {
  const dir = process.env.HELIOS_TEST_PG_BINDIR;
  return dir && isExecutable(join(dir, 'psql')) ? join(dir, 'psql') : 'psql';
}

export function runPsql(args: string[], env: Record<string, string>, input?: string): Promise<RunResult> {
  return run(psqlBin(), ['-X', ...args], { env: { ...process.env, ...env }, input });
}

export async function superQuery(sql: string, database = 'postgres'): Promise<string> {
  const pg = testPg();
  const args = ['-q', '-At', '-w', '-v', 'ON_ERROR_STOP=1', '-h', pg.host, '-p', String(pg.port), '-U', pg.superuser, '-d', database, '-f', '-'];
  const r = await runPsql(args, { PGPASSWORD: pg.password }, sql);
  if (r.code !== 0) throw new Error(`superQuery failed (${database}): ${r.stderr.trim()}`);
  return r.stdout.replace(/\n$/, '');
}
