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

/** A FIFO of small ints with a parallel payload slot, reused across requests to avoid per-message objects. */
export class ExpectQueue {
  private kinds: Expect[] = [];
  private payloads: (string | null)[] = [];
  /** An ErrorResponse to send instead of the backend's, for requests the proxy replaced to refuse them. */
  private substitutes: (Buffer | null)[] = [];
  private head = 0;

  get length(): number {
    return this.kinds.length - this.head;
  }

  push(kind: Expect, payload: string | null = null, substitute: Buffer | null = null): void {
    this.kinds.push(kind);
    this.payloads.push(payload);
    this.substitutes.push(substitute);
  }

  peekSubstitute(): Buffer | null {
    return this.substitutes[this.head] ?? null;
  }

  peek(): Expect | undefined {
    return this.kinds[this.head];
  }

  peekPayload(): string | null {
    return this.payloads[this.head] ?? null;
  }

  /** Removes and returns the newest entry (only right after a push). */
  popLast(): Expect {
    this.payloads.pop();
    this.substitutes.pop();
    return this.kinds.pop()!;
  }

  shift(): void {
    this.head++;
    if (this.head === this.kinds.length) this.clear();
  }

  clear(): void {
    this.kinds.length = 0;
    this.payloads.length = 0;
    this.substitutes.length = 0;
    this.head = 0;
  }

  /** Whether nothing but the head request (and the Sync closing it) is in flight. */
  onlyHeadInFlight(): boolean {
    const n = this.length;
    if (n <= 1) return true;
    return n === 2 && this.kinds[this.head] !== Expect.Sync && this.kinds[this.head + 1] === Expect.Sync;
  }

  /** Removes Sync entries behind the head (the backend ignores Sync while in COPY FROM STDIN). */
  dropSyncsAfterHead(): void {
    for (let i = this.kinds.length - 1; i > this.head; i--) {
      if (this.kinds[i] === Expect.Sync) {
        this.kinds.splice(i, 1);
        this.payloads.splice(i, 1);
        this.substitutes.splice(i, 1);
      }
    }
  }
}
