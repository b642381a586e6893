// policy/ owns what a tenant's SQL may do. This file is the tenant's QPS token bucket: refilled at
// qps_limit per second, holding at most qps_limit × burst_multiplier, shared by all the tenant's
// connections. A statement over the limit is refused at once, never queued.
import { turnNow } from '../io/native-socket.js';

export class TokenBucket {
  private tokens: number;
  private last: number;

  constructor(
    public rate: number,
    public capacity: number,
    private readonly now: () => number = turnNow,
  ) {
    this.tokens = capacity;
    this.last = this.now();
  }

  /** Reconfigures on reload, keeping the current fill (capped to the new capacity). */
  reconfigure(rate: number, capacity: number): void {
    this.refill();
    this.rate = rate;
    this.capacity = capacity;
    this.tokens = Math.min(this.tokens, capacity);
  }

  private refill(): void {
    const t = this.now();
    this.tokens = Math.min(this.capacity, this.tokens + ((t - this.last) * this.rate) / 1000);
    this.last = t;
  }

  /** Takes `n` tokens; returns 0 on success, else the milliseconds until `n` would be available. */
  take(n = 1): number {
    this.refill();
    if (this.tokens >= n) {
      this.tokens -= n;
      return 0;
    }
    return Math.ceil(((n - this.tokens) * 1000) / this.rate);
  }

  get level(): number {
    this.refill();
    return this.tokens;
  }
}
