// session/ owns client sessions. This file maps the BackendKeyData the proxy hands each client to that
// client's session, so a CancelRequest reaches whichever backend serves it now, or nothing.
import { randomInt } from 'node:crypto';

export interface Cancellable {
  cancel(): void;
}

export class CancelRegistry {
  private readonly byPid = new Map<number, { secret: number; target: Cancellable }>();

  /** Issues a (pid, secret) pair unique among live sessions. */
  register(target: Cancellable): { pid: number; secret: number } {
    let pid: number;
    do pid = randomInt(1, 2 ** 31 - 1);
    while (this.byPid.has(pid));
    const secret = randomInt(-(2 ** 31), 2 ** 31 - 1);
    this.byPid.set(pid, { secret, target });
    return { pid, secret };
  }

  unregister(pid: number): void {
    this.byPid.delete(pid);
  }

  /** A wrong secret is ignored silently, as PostgreSQL does, so keys cannot be probed. */
  cancel(pid: number, secret: number): boolean {
    const e = this.byPid.get(pid);
    if (e === undefined || e.secret !== secret) return false;
    e.target.cancel();
    return true;
  }
}
