// cli/ owns the `heliosproxy` command. This file is `heliosproxy demo`: a throwaway PostgreSQL seeded with
// the multi-tenant scenario, the proxy in front of it with the reference configuration, and a clean exit
// on Ctrl-C. A newcomer sees the scenario work without configuring anything.
import { join } from 'node:path';
import { loadConfigFile, primaryNode } from '../config/load.js';
import { PostgresNotFoundError, seedScenario, startLocalPostgres, type LocalPostgres } from '../localpg/index.js';
import { pino } from 'pino';
import { ProxyServer } from '../server.js';
import { packageRoot } from './main.js';

export async function runDemo(opts: { port: number; adminPort: number }): Promise<number> {
  let pg: LocalPostgres | null = null;
  let proxy: ProxyServer | null = null;
  const cleanup = async (): Promise<void> => {
    await proxy?.close().catch(() => undefined);
    await pg?.stop().catch(() => undefined);
  };
  try {
    process.stdout.write('Starting a throwaway PostgreSQL…\n');
    pg = await startLocalPostgres();
    await seedScenario(pg);
    const loaded = loadConfigFile(join(packageRoot, 'examples', 'proxy.toml'));
    const node = primaryNode(loaded.config);
    node.host = pg.host;
    node.port = pg.port;
    proxy = await ProxyServer.start(loaded, {
      logger: pino({ level: process.env.HELIOS_LOG_LEVEL ?? 'warn' }),
      listen: { host: '127.0.0.1', port: opts.port },
      admin: { host: '127.0.0.1', port: opts.adminPort },
    });
    const p = proxy.port;
    process.stdout.write(`
HeliosProxy is serving the multi-tenant scenario.
  PostgreSQL ${pg.version} (throwaway, data in ${pg.dataDir}) on 127.0.0.1:${pg.port}
  proxy on 127.0.0.1:${p} (transaction pooling), admin API on http://127.0.0.1:${proxy.adminPort}

Acme Corp (schema isolation: shared_db, schema acme):
  PGPASSWORD=apppass psql -h localhost -p ${p} -U acme.appuser -d shared_db -c 'SELECT * FROM orders'

WidgetCo (database isolation: widgetco_db):
  PGPASSWORD=apppass psql -h localhost -p ${p} -U widgetco.appuser -d widgetco_db -c 'SELECT * FROM orders'

Admin API:
  curl -s http://127.0.0.1:${proxy.adminPort}/tenants

Press Ctrl-C to stop; the throwaway PostgreSQL is removed.
`);
    await new Promise<void>((resolve) => {
      process.once('SIGINT', resolve);
      process.once('SIGTERM', resolve);
    });
    process.stdout.write('\nStopping…\n');
    await cleanup();
    return 0;
  } catch (err) {
    await cleanup();
    if (err instanceof PostgresNotFoundError) {
      process.stderr.write(`heliosproxy demo: ${err.message}\n`);
      return 1;
    }
    throw err;
  }
}
