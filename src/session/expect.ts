// session/ owns a client's life from StartupMessage to Terminate. This file is the queue of responses a
// ClientSession still expects from its backend, in request order. It is what lets the proxy answer some
// requests itself (a Parse it already prepared on this connection), swallow responses to requests it
// injected, honour PostgreSQL's skip-until-Sync after an error, and know exactly when a transaction-mode
// connection has nothing in flight and can be released.

export const enum Expect {
  /** Answered by ParseComplete; payload: proxy statement name when the proxy names it, else null. */
  Parse = 1,
  Bind,
  Describe,
  Execute,
  Close,
  /** Ends at ReadyForQuery: Sync, simple Query, FunctionCall. */
  Sync,
  /** Responses the backend will send for messages the proxy injected: dropped, not forwarded. */
  DropParse,
  DropClose,
  /** Responses the proxy writes itself, in order, without the backend. */
  SynthParseComplete,
  SynthCloseComplete,
  /**
   * A Query the proxy sent to fail the backend's transaction (after it refused a statement the backend had
   * already run): its ErrorResponse is dropped, its ReadyForQuery ('E') goes to the client.
   */
  Internal,
  /** A statement the proxy sent ahead of the client's (BEGIN of a wrapped Query): everything it answers is dropped. */
  InternalSilent,
}

/**
 * Writes slot `i` of a reused array: a plain store inside its length, a push just past it. Truncating such
 * arrays with `length = 0` is a V8 runtime call, so queues keep their length and track head/tail instead.
 */
export function storeAt<T>(a: T[], i: number, v: T): void {
  if (i < a.length) a[i] = v;
  else a.push(v);
}

/** A FIFO of small ints with a parallel payload slot, reused across requests to avoid per-message objects. */
export class ExpectQueue {
  // Entries from head to tail are live. The arrays keep their length across requests: truncating them is
  // a runtime call, and a request pushes onto the same slots again.
  private readonly kinds: Expect[] = [];
  private readonly payloads: (string | null)[] = [];
  /** An ErrorResponse to send instead of the backend's, for requests the proxy replaced to refuse them. */
  private readonly substitutes: (Buffer | null)[] = [];
  private head = 0;
  private tail = 0;

  get length(): number {
    return this.tail - this.head;
  }

  push(kind: Expect, payload: string | null = null, substitute: Buffer | null = null): void {
    const i = this.tail++;
    storeAt(this.kinds, i, kind);
    storeAt(this.payloads, i, payload);
    storeAt(this.substitutes, i, substitute);
  }

  peekSubstitute(): Buffer | null {
    return this.head < this.tail ? this.substitutes[this.head]! : null;
  }

  peek(): Expect | undefined {
    return this.head < this.tail ? this.kinds[this.head] : undefined;
  }

  peekPayload(): string | null {
    return this.head < this.tail ? this.payloads[this.head]! : null;
  }

  /** Removes and returns the newest entry (only right after a push). */
  popLast(): Expect {
    const i = --this.tail;
    this.payloads[i] = null;
    this.substitutes[i] = null;
    return this.kinds[i]!;
  }

  shift(): void {
    if (this.head >= this.tail) return;
    this.payloads[this.head] = null;
    this.substitutes[this.head] = null;
    if (++this.head === this.tail) this.head = this.tail = 0;
  }

  clear(): void {
    for (let i = this.head; i < this.tail; i++) {
      this.payloads[i] = null;
      this.substitutes[i] = null;
    }
    this.head = 0;
    this.tail = 0;
  }

  /** Whether nothing but the head request (and the Sync closing it) is in flight. */
  onlyHeadInFlight(): boolean {
    const n = this.length;
    if (n <= 1) return true;
    return n === 2 && this.kinds[this.head] !== Expect.Sync && this.kinds[this.head + 1] === Expect.Sync;
  }

  /** Removes Sync entries behind the head (the backend ignores Sync while in COPY FROM STDIN). */
  dropSyncsAfterHead(): void {
    if (this.tail - this.head <= 1) return;
    let to = this.head + 1;
    for (let from = this.head + 1; from < this.tail; from++) {
      if (this.kinds[from] === Expect.Sync) continue;
      this.kinds[to] = this.kinds[from]!;
      this.payloads[to] = this.payloads[from]!;
      this.substitutes[to] = this.substitutes[from]!;
      to++;
    }
    for (let i = to; i < this.tail; i++) {
      this.payloads[i] = null;
      this.substitutes[i] = null;
    }
    this.tail = to;
  }
}
