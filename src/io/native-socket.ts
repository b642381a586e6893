// io/ owns the byte transport under client sessions and backend connections: the ByteStream both use,
// and NativeSocket, which takes an authenticated plaintext TCP socket over from Node's net.Socket so the
// relay's reads and writes skip Node's stream layer (native/fastio.c). Everything above this folder sees
// the same events either way: 'data', 'drain', 'end', 'error', 'close'.
import { EventEmitter } from 'node:events';
import { createRequire } from 'node:module';
import { Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import { TLSSocket } from 'node:tls';
import { getSystemErrorName } from 'node:util';

/** What sessions and backend connections need of a socket; net.Socket, TLSSocket and NativeSocket all are. */
export interface ByteStream {
  write(data: Buffer | string): boolean;
  end(): unknown;
  end(data: Buffer | string): unknown;
  destroy(error?: Error): unknown;
  pause(): unknown;
  resume(): unknown;
  isPaused(): boolean;
  cork(): void;
  uncork(): void;
  readonly destroyed: boolean;
  readonly writableEnded: boolean;
  readonly remoteAddress?: string | undefined;
  readonly remotePort?: number | undefined;
  on(event: 'data', listener: (chunk: Buffer) => void): unknown;
  on(event: 'error', listener: (err: Error) => void): unknown;
  on(event: 'close' | 'end' | 'drain', listener: () => void): unknown;
  once(event: 'data', listener: (chunk: Buffer) => void): unknown;
  once(event: 'error', listener: (err: Error) => void): unknown;
  once(event: 'close' | 'end' | 'drain', listener: () => void): unknown;
  off(event: 'data', listener: (chunk: Buffer) => void): unknown;
  removeAllListeners(event?: string): unknown;
}

/** The addon's surface (native/fastio.c). A channel is an opaque handle. */
interface Channel {
  readonly __channel: unique symbol;
}
interface FastIo {
  setup(readBuffer: Buffer, events: Int32Array, outBuffer: Buffer, outs: Int32Array, onBatch: (count: number) => void): void;
  open(fd: number, id: number): Channel;
  flush(count: number): void;
  write(ch: Channel, data: Buffer): number;
  writev(ch: Channel, data: Buffer[]): number;
  setReading(ch: Channel, on: boolean): void;
  shutdown(ch: Channel): number;
  queued(ch: Channel): number;
  close(ch: Channel): void;
}

/** EventEmitter's own listener type, for the overrides below. */
type EmitterListener = Parameters<EventEmitter['on']>[1];

const EV_DATA = 0;
const EV_END = 1;
const EV_ERROR = 2;
const EV_DRAIN = 3;

// Memory shared with the addon (see native/fastio.c). One event-loop turn's reads land end to end in
// readBuffer and are described by (channel id, kind, value) triples in `events`; JS copies each read out
// while it handles the batch. Writes made while handling a batch are copied into outBuffer, described by
// (channel id, offset, length) triples in `outs`, and sent by one flush() when the batch is done.
const READ_BUFFER_SIZE = 1 << 20; // at least 16 full 64 KiB reads per batch
const MAX_EVENTS = 4096;
const OUT_BUFFER_SIZE = 1 << 20;
const MAX_OUTS = 4096;
/** Larger writes go straight to the kernel: copying them would cost more than the call saved. */
const MAX_DEFERRED_WRITE = 16384;

const readBuffer = Buffer.allocUnsafeSlow(READ_BUFFER_SIZE);
const events = new Int32Array(3 * MAX_EVENTS);
const outBuffer = Buffer.allocUnsafeSlow(OUT_BUFFER_SIZE);
const outs = new Int32Array(3 * MAX_OUTS);
/** The socket of each triple in `outs` (flush overwrites the id with the result). */
const outSockets: (NativeSocket | null)[] = new Array<NativeSocket | null>(MAX_OUTS).fill(null);
let outCount = 0;
let outUsed = 0;
/** A batch is being handled: writes are collected for one flush at its end. */
let dispatching = false;
let batchStartedAt = 0;

/**
 * performance.now() as read when the batch now being handled started, or read now outside a batch. The
 * proxy's per-request clocks (request latency, statement start, pool idle times, the QPS bucket) need no
 * finer grain than one event-loop turn, and four clock reads per transaction were ~1% of its CPU.
 */
export function turnNow(): number {
  return dispatching ? batchStartedAt : performance.now();
}

/** Open sockets by channel id. An id is reused once its channel is closed (the addon voids its pending events). */
const socketsById: (NativeSocket | undefined)[] = [];
const freeIds: number[] = [];

function onBatch(count: number): void {
  batchStartedAt = performance.now();
  dispatching = true;
  let offset = 0;
  try {
    for (let i = 0, j = 0; i < count; i++, j += 3) {
      const kind = events[j + 1]!;
      const value = events[j + 2]!;
      const start = offset;
      if (kind === EV_DATA) offset += value;
      // Read now, not before the loop: a socket closed while an earlier event was handled has its id voided.
      const id = events[j]!;
      const socket = id < 0 ? undefined : socketsById[id];
      if (socket === undefined) continue;
      try {
        socket.onEvent(kind, value, start);
      } catch (err) {
        // As from a net.Socket listener: an uncaught exception, without losing the rest of the batch.
        process.nextTick(rethrow, err);
      }
    }
  } finally {
    dispatching = false;
    flushDeferred();
  }
}

function rethrow(err: unknown): never {
  throw err;
}

/** Sends the writes collected during a batch, then applies each result to its socket. */
function flushDeferred(): void {
  const n = outCount;
  if (n === 0) return;
  outCount = 0;
  outUsed = 0;
  loaded.io!.flush(n);
  for (let i = 0, j = 0; i < n; i++, j += 3) {
    const socket = outSockets[i]!;
    outSockets[i] = null;
    socket.flushed(outs[j]!);
  }
}

function loadFastIo(): { io: FastIo | null; why: string } {
  let io: FastIo;
  try {
    io = createRequire(import.meta.url)('../../build/Release/fastio.node') as FastIo;
  } catch (err) {
    return { io: null, why: `native/fastio.c not built (${err instanceof Error ? err.message.split('\n')[0] : String(err)}); run npm install with a C compiler` };
  }
  try {
    // Its shared buffers belong to one thread: a worker thread keeps to Node's sockets.
    io.setup(readBuffer, events, outBuffer, outs, onBatch);
    return { io, why: 'native/fastio.c built' };
  } catch (err) {
    return { io: null, why: `native/fastio.c is in use by another thread of this process (${err instanceof Error ? err.message : String(err)})` };
  }
}

const loaded = loadFastIo();

/** Whether the native socket layer can be used, and why not when it cannot. */
export const nativeSocketLayer: { readonly available: boolean; readonly reason: string } = {
  available: loaded.io !== null,
  reason: loaded.why,
};

/** Connections on the native layer right now (client and backend), for the admin API. */
export const nativeSocketStats = { open: 0 };

/** The file descriptor behind a connected net.Socket (Node keeps it on its internal TCP handle). */
function socketFd(socket: Socket): number | null {
  const handle = (socket as unknown as { _handle?: { fd?: unknown } | null })._handle;
  const fd = handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : null;
}

/**
 * Moves a connected plaintext TCP socket onto the native layer, or returns null to keep it as it is: TLS
 * sockets, in-process streams, and sockets with bytes still queued in Node (either way) stay with Node,
 * since moving them would reorder or lose bytes.
 */
export function adoptSocket(socket: ByteStream): NativeSocket | null {
  const io = loaded.io;
  if (io === null || !(socket instanceof Socket) || socket instanceof TLSSocket) return null;
  if (socket.destroyed || socket.connecting || socket.writableLength > 0 || socket.readableLength > 0) return null;
  const fd = socketFd(socket);
  if (fd === null) return null;
  const { remoteAddress, remotePort } = socket;
  socket.pause();
  const adopted = new NativeSocket(io, fd, remoteAddress, remotePort);
  // The channel holds its own dup of the descriptor: Node's handle closes the original and the
  // connection stays open. Its listeners belong to the old object and must not see that close.
  socket.removeAllListeners();
  socket.on('error', () => {});
  socket.destroy();
  return adopted;
}

function errnoError(code: number, syscall: string): NodeJS.ErrnoException {
  const name = getSystemErrorName(code);
  const err: NodeJS.ErrnoException = new Error(`${syscall} ${name}`);
  err.code = name;
  err.errno = code;
  err.syscall = syscall;
  return err;
}

/**
 * A TCP connection driven by native/fastio.c. Mirrors net.Socket with allowHalfOpen = false: when the
 * peer ends, whatever is queued is written and the socket closes. write() returns false while bytes
 * wait in the channel's queue, and 'drain' follows once the kernel took them.
 */
export class NativeSocket extends EventEmitter implements ByteStream {
  destroyed = false;
  writableEnded = false;
  private readableEnded = false;
  private paused = false;
  private corked = 0;
  // What a cork held back: the common case is one message, kept without an array.
  private corkedFirst: Buffer | null = null;
  private corkedRest: Buffer[] | null = null;
  private queued = false;
  /** The peer's FIN was read (its 'end' may still be held). */
  private eof = false;
  /**
   * Reads (a Buffer) and the FIN (null) of a batch that reached this socket after it was paused while the
   * batch was handled: a paused stream emits nothing until resumed.
   */
  private held: (Buffer | null)[] | null = null;
  private readonly id: number;
  private channel: Channel;
  /**
   * The relay's one 'data' listener, called directly: EventEmitter's lookup by event name is a
   * megamorphic load on every read. See on() for when the emitter takes over.
   */
  private dataListener: ((chunk: Buffer) => void) | null = null;

  constructor(
    private readonly io: FastIo,
    fd: number,
    readonly remoteAddress: string | undefined,
    readonly remotePort: number | undefined,
  ) {
    super();
    this.id = freeIds.pop() ?? socketsById.length;
    this.channel = io.open(fd, this.id);
    socketsById[this.id] = this;
    nativeSocketStats.open++;
  }

  /** One event of a batch; a DATA event's bytes are readBuffer[start, start + value). */
  onEvent(kind: number, value: number, start: number): void {
    if (this.destroyed) return;
    if (kind === EV_DATA) {
      // A slice of Node's Buffer pool for small reads: the bytes outlive the shared read buffer.
      const chunk = Buffer.allocUnsafe(value);
      readBuffer.copy(chunk, 0, start, start + value);
      if (this.paused || this.held !== null) (this.held ??= []).push(chunk);
      else this.data(chunk);
    } else if (kind === EV_DRAIN) {
      this.queued = false;
      if (this.writableEnded && this.readableEnded) this.destroy();
      else this.emit('drain');
    } else if (kind === EV_END) {
      this.eof = true;
      if (this.paused || this.held !== null) (this.held ??= []).push(null);
      else this.ended();
    } else if (kind === EV_ERROR) this.destroy(errnoError(value, 'read'));
  }

  private data(chunk: Buffer): void {
    const listener = this.dataListener;
    if (listener !== null) listener(chunk);
    else this.emit('data', chunk);
  }

  private ended(): void {
    this.readableEnded = true;
    this.emit('end');
    if (this.destroyed) return;
    if (!this.writableEnded) this.end();
    else if (!this.queued) this.destroy();
  }

  /** Delivers what arrived in the batch that paused this socket, in order, as a resumed net.Socket would. */
  private readonly replayHeld = (): void => {
    const held = this.held;
    if (held === null) return;
    while (held.length > 0 && !this.paused && !this.destroyed) {
      const item = held.shift()!;
      if (item === null) this.ended();
      else this.data(item);
    }
    if (held.length === 0 && this.held === held) this.held = null;
  };

  write(data: Buffer | string): boolean {
    if (this.destroyed || this.writableEnded) return false;
    const buf = typeof data === 'string' ? Buffer.from(data) : data;
    if (this.corked > 0) {
      if (this.corkedFirst === null) this.corkedFirst = buf;
      else (this.corkedRest ??= []).push(buf);
      return !this.queued;
    }
    return this.send(buf);
  }

  /**
   * During a batch, a small write is copied into the out buffer (joined to this socket's previous one when
   * that was the last collected) and sent by the batch's flush; otherwise it goes out now, after whatever
   * was collected. Either way the bytes reach the kernel in the order written.
   */
  private send(buf: Buffer): boolean {
    if (dispatching && !this.queued && buf.length <= MAX_DEFERRED_WRITE) {
      if (outUsed + buf.length > OUT_BUFFER_SIZE || outCount === MAX_OUTS) flushDeferred();
      buf.copy(outBuffer, outUsed);
      const last = 3 * (outCount - 1);
      if (outCount > 0 && outSockets[outCount - 1] === this && outs[last + 1]! + outs[last + 2]! === outUsed) outs[last + 2] = outs[last + 2]! + buf.length;
      else {
        const j = 3 * outCount;
        outs[j] = this.id;
        outs[j + 1] = outUsed;
        outs[j + 2] = buf.length;
        outSockets[outCount++] = this;
      }
      outUsed += buf.length;
      return true;
    }
    if (outCount > 0) flushDeferred();
    return this.sent(this.io.write(this.channel, buf));
  }

  /** The result of a collected write (flush): 0 sent, 1 queued (backpressure from the next write on), 2 closed, -errno. */
  flushed(result: number): void {
    if (this.destroyed) return;
    if (result === 1) this.queued = true;
    else if (result < 0) this.destroy(errnoError(result, 'write'));
  }

  private sent(result: number): boolean {
    if (result === 0) return !this.queued;
    if (result === 1) {
      this.queued = true;
      return false;
    }
    this.destroy(errnoError(result, 'write'));
    return false;
  }

  cork(): void {
    this.corked++;
  }

  uncork(): void {
    if (this.corked === 0 || --this.corked > 0) return;
    const first = this.corkedFirst;
    const rest = this.corkedRest;
    if (first === null || this.destroyed) return;
    this.corkedFirst = null;
    this.corkedRest = null;
    if (rest === null) this.send(first);
    else if (dispatching) {
      // Collected one after the other, they join into one send.
      this.send(first);
      for (const b of rest) this.send(b);
    } else {
      if (outCount > 0) flushDeferred();
      this.sent(this.io.writev(this.channel, [first, ...rest]));
    }
  }

  pause(): this {
    if (!this.paused && !this.destroyed) {
      this.paused = true;
      this.io.setReading(this.channel, false);
    }
    return this;
  }

  resume(): this {
    if (this.paused && !this.destroyed) {
      this.paused = false;
      if (!this.eof) this.io.setReading(this.channel, true);
      if (this.held !== null) process.nextTick(this.replayHeld);
    }
    return this;
  }

  isPaused(): boolean {
    return this.paused;
  }

  /** Writes `data`, then half-closes once everything queued is out (as net.Socket.end). */
  end(data?: Buffer | string): this {
    if (this.destroyed || this.writableEnded) return this;
    if (data !== undefined) this.write(data);
    if (this.corked > 0) {
      this.corked = 1;
      this.uncork();
    }
    if (this.destroyed) return this;
    this.writableEnded = true;
    if (outCount > 0) flushDeferred(); // what was written before end() goes before the FIN
    if (this.destroyed) return this;
    let r = this.io.shutdown(this.channel);
    if (r === -107) r = 0; // ENOTCONN: the peer is already gone, so our side is as closed as it gets
    if (r < 0) this.destroy(errnoError(r, 'shutdown'));
    else if (this.readableEnded && r === 0) this.destroy();
    return this;
  }

  // The slot holds the 'data' listener only while it is the only one: anything else registering for 'data'
  // (a second on(), once(), a prepend) moves it into the emitter first, where order and once-wrappers
  // work as EventEmitter defines them.
  override on(event: string | symbol, listener: EmitterListener): this {
    if (event === 'data' && this.dataListener === null && super.listenerCount('data') === 0 && !('listener' in listener)) {
      this.dataListener = listener as (chunk: Buffer) => void;
      return this;
    }
    if (event === 'data') this.unslotData();
    return super.on(event, listener);
  }

  override addListener(event: string | symbol, listener: EmitterListener): this {
    return this.on(event, listener);
  }

  override prependListener(event: string | symbol, listener: EmitterListener): this {
    if (event === 'data') this.unslotData();
    return super.prependListener(event, listener);
  }

  override prependOnceListener(event: string | symbol, listener: EmitterListener): this {
    if (event === 'data') this.unslotData();
    return super.prependOnceListener(event, listener);
  }

  // EventEmitter's once() removes its wrapper with removeListener, which off() is an alias of.
  override removeListener(event: string | symbol, listener: EmitterListener): this {
    if (event === 'data' && listener === this.dataListener) this.dataListener = null;
    else super.removeListener(event, listener);
    return this;
  }

  override off(event: string | symbol, listener: EmitterListener): this {
    return this.removeListener(event, listener);
  }

  override removeAllListeners(event?: string | symbol): this {
    if (event === undefined || event === 'data') this.dataListener = null;
    return super.removeAllListeners(event);
  }

  override listenerCount(event: string | symbol): number {
    return super.listenerCount(event) + (event === 'data' && this.dataListener !== null ? 1 : 0);
  }

  override listeners(event: string | symbol): EmitterListener[] {
    const l = super.listeners(event) as EmitterListener[];
    return event === 'data' && this.dataListener !== null ? [this.dataListener, ...l] : l;
  }

  private unslotData(): void {
    const l = this.dataListener;
    if (l === null) return;
    this.dataListener = null;
    super.on('data', l);
  }

  destroy(error?: Error): this {
    if (this.destroyed) return this;
    this.destroyed = true;
    this.writableEnded = true;
    // Bytes written before destroy() reach the kernel, as they would have without batching (a failure
    // there reports to flushed(), which ignores a destroyed socket).
    if (outCount > 0) flushDeferred();
    this.corkedFirst = null;
    this.corkedRest = null;
    this.held = null;
    this.io.close(this.channel);
    socketsById[this.id] = undefined;
    freeIds.push(this.id);
    nativeSocketStats.open--;
    // As net.Socket: 'error' and 'close' come after the current call stack, never inside it.
    process.nextTick(() => {
      if (error !== undefined && this.listenerCount('error') > 0) this.emit('error', error);
      this.emit('close', error !== undefined);
    });
    return this;
  }
}
