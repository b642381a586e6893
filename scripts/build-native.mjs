// Builds native/fastio.c (the relay's socket layer) with node-gyp at install time. Optional by design:
// without a C compiler the proxy runs on Node's own sockets, and says so at startup.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';

const args = ['rebuild'];
// Build against the headers of the running Node when they are installed beside it (no download needed).
const headers = join(dirname(dirname(process.execPath)), 'include', 'node', 'node_api.h');
if (!process.env.npm_config_nodedir && existsSync(headers)) args.push(`--nodedir=${dirname(dirname(process.execPath))}`);

const gypJs = process.env.npm_config_node_gyp;
const run = gypJs && existsSync(gypJs)
  ? spawnSync(process.execPath, [gypJs, ...args], { stdio: 'inherit' })
  : spawnSync('node-gyp', args, { stdio: 'inherit', shell: true });
if (run.status !== 0) {
  console.warn('heliosproxy: the native socket layer (native/fastio.c) was not built; the proxy will use Node sockets (slower relay, same behaviour).');
}
