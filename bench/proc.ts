// bench/proc.ts — process and port helpers for the benchmark: free ports, TCP readiness polling,
// short commands run to completion (killable on Ctrl-C), and long-lived services with an output tail.
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import net from 'node:net';

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr !== null ? addr.port : 0;
      srv.close(() => (port > 0 ? resolve(port) : reject(new Error('no free port'))));
    });
  });
}

export function canConnect(port: number, host = '127.0.0.1'): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = net.connect({ port, host });
    const done = (ok: boolean): void => { sock.destroy(); resolve(ok); };
    sock.setTimeout(1000, () => done(false));
    sock.once('connect', () => done(true));
    sock.once('error', () => done(false));
  });
}

/**
 * CPU time a process has used so far (user + system, ms), from /proc; null where there is no /proc.
 * Clock ticks are 10 ms on Linux: over a 10 s run that is well under 1% of what a pooler uses.
 */
export function cpuMs(pid: number): number | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may hold spaces and parentheses: count fields after its closing one.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) * 10;
  } catch {
    return null;
  }
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export interface RunResult { code: number | null; stdout: string; stderr: string; timedOut: boolean }

/** Short-lived commands in flight, so a Ctrl-C can kill them before cleanup. */
const inFlight = new Set<ChildProcess>();
export function killInFlight(): void { for (const c of inFlight) c.kill('SIGKILL'); }

/** Runs a command to completion, capturing its output; never rejects. */
export function run(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { env: opts.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'] });
    inFlight.add(child);
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    child.stdout?.on('data', (d: Buffer) => { stdout += d.toString(); });
    child.stderr?.on('data', (d: Buffer) => { stderr += d.toString(); });
    const timer = opts.timeoutMs === undefined ? undefined
      : setTimeout(() => { timedOut = true; child.kill('SIGKILL'); }, opts.timeoutMs);
    child.on('error', (e) => { stderr += `${cmd}: ${e.message}\n`; });
    child.on('close', (code) => {
      clearTimeout(timer);
      inFlight.delete(child);
      resolve({ code, stdout, stderr, timedOut });
    });
  });
}

/** A long-lived child process (proxy, PgBouncer) whose last output is kept for error messages. */
export class Service {
  private readonly child: ChildProcess;
  private out = '';
  private exit: string | null = null;
  private readonly exited: Promise<void>;

  constructor(readonly name: string, cmd: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}) {
    this.child = spawn(cmd, args, { cwd: opts.cwd, env: opts.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'] });
    const keep = (d: Buffer): void => { this.out = (this.out + d.toString()).slice(-8000); };
    this.child.stdout?.on('data', keep);
    this.child.stderr?.on('data', keep);
    this.exited = new Promise((resolve) => {
      this.child.on('error', (e) => {
        this.out += `\n${e.message}`;
        if (this.child.pid === undefined) { this.exit = 'failed to spawn'; resolve(); }
      });
      this.child.on('exit', (code, signal) => { this.exit = signal ? `killed by ${signal}` : `exited with code ${code}`; resolve(); });
    });
  }

  /** First line: what happened and the last output line; then the output tail, indented. */
  private failure(what: string): Error {
    const lines = this.out.trimEnd().split('\n').filter((l) => l.trim() !== '');
    const last = lines.at(-1)?.trim();
    return new Error(`${this.name} ${what}${last ? `: ${last}` : ''}\n${lines.slice(-20).map((l) => `    | ${l}`).join('\n')}`);
  }

  died(): string | null { return this.exit === null ? null : this.failure(this.exit).message; }

  get pid(): number | undefined { return this.child.pid; }

  /** Resolves once a TCP connect to `port` succeeds; throws (with the output tail) on early exit or timeout. */
  async waitForPort(port: number, timeoutMs = 15_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (this.exit !== null) throw this.failure(`${this.exit} before accepting connections`);
      if (await canConnect(port)) return;
      await sleep(100);
    }
    throw this.failure(`not accepting connections on port ${port} after ${timeoutMs / 1000} s`);
  }

  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    if (this.exit !== null) return;
    this.child.kill(signal);
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 5000);
    await this.exited;
    clearTimeout(timer);
  }
}
