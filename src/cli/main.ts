// cli/ owns the `heliosproxy` command: run the proxy from a config file, check a config file, or run the
// demo (a throwaway PostgreSQL seeded with the scenario plus the proxy). Parses flags, prints, exits.
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ConfigError, loadConfigFile } from '../config/load.js';
import { ProxyServer } from '../server.js';
import { runDemo } from './demo.js';

const USAGE = `heliosproxy — a multi-tenant PostgreSQL proxy

Usage:
  heliosproxy --config proxy.toml        run the proxy
  heliosproxy check-config proxy.toml    validate a config file and print every problem
  heliosproxy demo [--port 6432] [--admin-port 9090]
                                         throwaway PostgreSQL seeded with the scenario + the proxy
  heliosproxy --help | --version
`;

export const packageRoot = dirname(dirname(dirname(fileURLToPath(import.meta.url))));

function version(): string {
  const pkg = JSON.parse(readFileSync(join(packageRoot, 'package.json'), 'utf8')) as { version: string };
  return pkg.version;
}

/** Reads `--name value` / `--name=value`. */
function flag(args: string[], name: string): string | undefined {
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === `--${name}`) return args[i + 1];
    if (a.startsWith(`--${name}=`)) return a.slice(name.length + 3);
  }
  return undefined;
}

function portFlag(args: string[], name: string): number | undefined {
  const v = flag(args, name);
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0 || n > 65535) throw new UsageError(`--${name}: expected a port number, got "${v}"`);
  return n;
}

class UsageError extends Error {}

export async function runCli(argv: string[]): Promise<number> {
  try {
    if (argv.includes('--help') || argv.includes('-h')) {
      process.stdout.write(USAGE);
      return 0;
    }
    if (argv.includes('--version')) {
      process.stdout.write(version() + '\n');
      return 0;
    }
    const command = argv[0] !== undefined && !argv[0].startsWith('-') ? argv[0] : 'run';
    switch (command) {
      case 'check-config':
        return checkConfig(argv[1] ?? flag(argv, 'config'));
      case 'demo':
        return await runDemo({ port: portFlag(argv, 'port') ?? 6432, adminPort: portFlag(argv, 'admin-port') ?? 9090 });
      case 'run':
        return await run(argv);
      default:
        throw new UsageError(`unknown command "${command}"`);
    }
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`heliosproxy: ${err.message}\n\n${USAGE}`);
      return 2;
    }
    if (err instanceof ConfigError) {
      process.stderr.write(`heliosproxy: ${err.message}\n`);
      return 1;
    }
    process.stderr.write(`heliosproxy: ${err instanceof Error ? err.message : String(err)}\n`);
    return 1;
  }
}

function checkConfig(path: string | undefined): number {
  if (path === undefined) throw new UsageError('check-config needs a file');
  if (!existsSync(path)) throw new UsageError(`no such file: ${path}`);
  const loaded = loadConfigFile(path); // throws ConfigError listing every problem
  const c = loaded.config;
  process.stdout.write(`${path}: OK — ${c.multi_tenancy.tenants.length} tenant(s), pool mode ${c.pool_mode.mode}, listening on ${c.listen_address}\n`);
  if (loaded.notEnforced.length > 0) process.stdout.write(`warning: these keys load but are not enforced yet: ${loaded.notEnforced.join(', ')}\n`);
  return 0;
}

async function run(argv: string[]): Promise<number> {
  const path = flag(argv, 'config');
  if (path === undefined) throw new UsageError('--config is required');
  const loaded = loadConfigFile(path);
  const port = portFlag(argv, 'port');
  const listen = port === undefined ? undefined : { host: loaded.config.listen_address.replace(/:\d+$/, '').replace(/^\[|\]$/g, ''), port };
  const proxy = await ProxyServer.start(loaded, listen === undefined ? {} : { listen });
  process.on('SIGHUP', () => {
    proxy.log.info('SIGHUP: reloading configuration');
    try {
      proxy.reload();
    } catch (err) {
      // A signal handler that throws would end the process: the running configuration stays instead.
      proxy.log.error({ err: err instanceof Error ? err.stack : String(err) }, 'reload failed unexpectedly');
    }
  });
  await new Promise<void>((resolve) => {
    const stop = (signal: string): void => {
      proxy.log.info({ signal, timeout_secs: proxy.config.shutdown_timeout_secs }, 'shutting down: letting transactions in flight finish');
      proxy.shutdown().then(resolve, resolve);
    };
    process.once('SIGINT', () => stop('SIGINT'));
    process.once('SIGTERM', () => stop('SIGTERM'));
  });
  return 0;
}
