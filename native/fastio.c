// fastio: a socket for the proxy's relay that skips Node's stream layer.
//
// Why: on a 2-core machine a transaction through the proxy costs two reads and two writes, and Node's
// net.Socket adds per call a Readable push, a Writable queue, a WriteWrap and a nextTick. This channel
// takes over an already connected, already authenticated TCP socket (a dup of its fd), reads with one
// recv(2) per readiness event, and writes with send(2)/sendmsg(2) straight from the caller's buffers.
// Whatever the kernel does not take is copied into the channel's own queue and written when the socket is
// writable again, so JS never has to keep a buffer alive.
//
// Batching: entering JS costs more than the JS a relay runs per message, and at 20 clients one epoll
// wake-up reports a dozen ready sockets. So events are collected for the whole poll phase and reach JS in
// one call per event-loop turn (from a uv_check handle, which runs right after the poll phase): each event
// is a triple (channel id, kind, value) in a shared Int32Array, with the bytes of every DATA event laid end
// to end in the shared read buffer. Kinds: DATA (value = byte count), END (peer closed its side), ERROR
// (value = -errno), DRAIN (the queue emptied). The writes JS makes while handling a batch come back the
// same way: flush(count) sends the (channel id, offset, length) triples it collected in its out buffer.
// Functions return 0 when done, 1 when bytes were queued, -errno on failure.
#include <node_api.h>
#include <uv.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

enum { EV_DATA = 0, EV_END = 1, EV_ERROR = 2, EV_DRAIN = 3 };
#define MAX_IOV 64

typedef struct Channel {
  uv_poll_t poll;
  int fd;
  int32_t id; // JS's index for it: events name their channel by id, never by pointer
  char *queue;
  size_t queue_start, queue_end, queue_cap;
  int reading;         // wants readable events
  int polled_events;   // what the poll handle watches now
  int shutdown_wanted; // shutdown(SHUT_WR) once the queue is empty
  int closing;         // close() called: no more events, no more I/O
  int handle_closed;   // uv_close finished
  int finalized;       // the JS External was collected
} Channel;

// Shared with JS (setup): the read buffer every channel reads into during a batch, the event triples,
// the out buffer and its triples. JS copies each read out of the read buffer before the batch call
// returns. One set per process means one JS thread: the addon is used from the main thread only.
static napi_env batch_env = NULL;
static napi_ref batch_refs[4]; // the four shared buffers, kept alive
static napi_ref on_batch = NULL;
static napi_async_context batch_ctx;
static uv_check_t batch_check;
static char *read_buffer = NULL;
static size_t read_buffer_len = 0, read_used = 0;
static int32_t *events = NULL;
static size_t events_cap = 0, event_count = 0; // in triples
static char *out_buffer = NULL;
static size_t out_buffer_len = 0;
static int32_t *outs = NULL;
static size_t outs_cap = 0;

// Open channels by id (JS reuses an id once its channel is closed).
static Channel **channels = NULL;
static size_t channels_cap = 0;

// The most one recv takes: a read buffer with less room left is handed to JS first.
#define READ_CHUNK 65536

static void on_poll(uv_poll_t *handle, int status, int events);

static void update_poll(Channel *c) {
  if (c->closing) return;
  int want = 0;
  if (c->reading) want |= UV_READABLE;
  if (c->queue_end > c->queue_start) want |= UV_WRITABLE;
  if (want == c->polled_events) return;
  c->polled_events = want;
  if (want == 0) uv_poll_stop(&c->poll);
  else uv_poll_start(&c->poll, want, on_poll);
}

// Hands the collected events to JS in one call. make_callback (not call_function): queued microtasks and
// nextTicks run afterwards, as after Node's own stream callbacks.
static void deliver_batch(void) {
  if (event_count == 0 || on_batch == NULL) return;
  napi_env env = batch_env;
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  napi_value cb, recv, argv[1], result;
  if (napi_get_reference_value(env, on_batch, &cb) == napi_ok && cb != NULL) {
    napi_get_global(env, &recv);
    napi_create_uint32(env, (uint32_t)event_count, &argv[0]);
    if (napi_make_callback(env, batch_ctx, recv, cb, 1, argv, &result) == napi_pending_exception) {
      // JS catches its listeners' exceptions itself; this is a bug in the dispatcher. Left pending, it
      // would swallow every later callback, so it surfaces as an uncaught exception.
      napi_value err;
      if (napi_get_and_clear_last_exception(env, &err) == napi_ok) napi_fatal_exception(env, err);
    }
  }
  napi_close_handle_scope(env, scope);
  event_count = 0;
  read_used = 0;
}

static void on_check(uv_check_t *handle) {
  (void)handle;
  deliver_batch();
}

static void push_event(Channel *c, int kind, int value) {
  if (event_count == events_cap) {
    deliver_batch();
    if (c->closing) return; // JS closed it meanwhile: its events are void
  }
  int32_t *e = events + 3 * event_count++;
  e[0] = c->id;
  e[1] = kind;
  e[2] = value;
}

// Writes queued bytes; 0 when the queue is empty, 1 when some remain, -errno on failure.
static int flush_queue(Channel *c) {
  while (c->queue_end > c->queue_start) {
    ssize_t n = send(c->fd, c->queue + c->queue_start, c->queue_end - c->queue_start, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return 1;
      return -errno;
    }
    c->queue_start += (size_t)n;
  }
  c->queue_start = c->queue_end = 0;
  return 0;
}

static int enqueue(Channel *c, const char *data, size_t len) {
  size_t used = c->queue_end - c->queue_start;
  if (c->queue_start > 0 && used > 0) memmove(c->queue, c->queue + c->queue_start, used);
  c->queue_start = 0;
  c->queue_end = used;
  if (used + len > c->queue_cap) {
    size_t cap = c->queue_cap == 0 ? 16384 : c->queue_cap;
    while (cap < used + len) cap *= 2;
    char *grown = realloc(c->queue, cap);
    if (grown == NULL) return -ENOMEM;
    c->queue = grown;
    c->queue_cap = cap;
  }
  memcpy(c->queue + c->queue_end, data, len);
  c->queue_end += len;
  return 0;
}

static void on_poll(uv_poll_t *handle, int status, int ready) {
  Channel *c = (Channel *)handle->data;
  if (c->closing || events == NULL) return;
  if (status < 0) {
    push_event(c, EV_ERROR, status);
    return;
  }
  if (ready & UV_WRITABLE) {
    int r = flush_queue(c);
    if (r < 0) {
      push_event(c, EV_ERROR, r);
      return;
    }
    if (r == 0) {
      if (c->shutdown_wanted) shutdown(c->fd, SHUT_WR);
      update_poll(c);
      push_event(c, EV_DRAIN, 0);
      if (c->closing) return;
    }
  }
  if ((ready & UV_READABLE) && c->reading) {
    // Room for a whole chunk and its event, or JS takes what the batch holds first. JS may close this
    // channel while it handles that batch.
    if (read_buffer_len - read_used < READ_CHUNK || event_count == events_cap) {
      deliver_batch();
      if (c->closing || !c->reading) return;
    }
    ssize_t n;
    do n = recv(c->fd, read_buffer + read_used, READ_CHUNK, 0);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n <= 0) {
      int err = n == 0 ? 0 : -errno;
      c->reading = 0;
      update_poll(c);
      if (err == 0) push_event(c, EV_END, 0);
      else push_event(c, EV_ERROR, err);
      return;
    }
    read_used += (size_t)n;
    push_event(c, EV_DATA, (int)n);
  }
}

static void on_handle_closed(uv_handle_t *handle) {
  Channel *c = (Channel *)handle->data;
  close(c->fd);
  free(c->queue);
  c->queue = NULL;
  c->handle_closed = 1;
  if (c->finalized) free(c);
}

static void close_channel(Channel *c) {
  if (c->closing) return;
  c->closing = 1;
  // Its events still waiting in the batch must not reach whichever channel reuses the id.
  for (size_t i = 0; i < event_count; i++)
    if (events[3 * i] == c->id) events[3 * i] = -1;
  if ((size_t)c->id < channels_cap && channels[c->id] == c) channels[c->id] = NULL;
  uv_close((uv_handle_t *)&c->poll, on_handle_closed);
}

static void finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  Channel *c = (Channel *)data;
  c->finalized = 1;
  if (!c->closing) close_channel(c); // unreachable while open: JS holds the socket until it closes it
  else if (c->handle_closed) free(c);
}

static napi_value make_int(napi_env env, int v) {
  napi_value r;
  napi_create_int32(env, v, &r);
  return r;
}

static Channel *channel_arg(napi_env env, napi_value v) {
  void *p = NULL;
  if (napi_get_value_external(env, v, &p) != napi_ok || p == NULL) {
    napi_throw_type_error(env, NULL, "fastio: expected a channel");
    return NULL;
  }
  return (Channel *)p;
}

// A call whose first argument is a channel: its arguments into argv, and the channel (NULL, with a
// TypeError thrown, when arguments are missing or the first is not a channel).
static Channel *channel_args(napi_env env, napi_callback_info info, napi_value *argv, size_t want) {
  size_t argc = want;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < want) {
    napi_throw_type_error(env, NULL, "fastio: missing arguments");
    return NULL;
  }
  return channel_arg(env, argv[0]);
}

// open(fd, id) -> channel. Duplicates fd, so the caller closes its own copy. `id` names the channel in
// events and in flush(); it must not belong to another open channel.
static napi_value js_open(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t fd, id;
  if (argc < 2 || napi_get_value_int32(env, argv[0], &fd) != napi_ok || napi_get_value_int32(env, argv[1], &id) != napi_ok || id < 0) {
    napi_throw_type_error(env, NULL, "fastio.open(fd, id)");
    return NULL;
  }
  if ((size_t)id >= channels_cap) {
    size_t cap = channels_cap == 0 ? 1024 : channels_cap;
    while (cap <= (size_t)id) cap *= 2;
    Channel **grown = realloc(channels, cap * sizeof(Channel *));
    if (grown == NULL) {
      napi_throw_error(env, NULL, "fastio: out of memory");
      return NULL;
    }
    memset(grown + channels_cap, 0, (cap - channels_cap) * sizeof(Channel *));
    channels = grown;
    channels_cap = cap;
  }
  if (channels[id] != NULL) {
    napi_throw_error(env, NULL, "fastio.open: id in use");
    return NULL;
  }
  int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own < 0) {
    napi_throw_error(env, NULL, "fastio: dup failed");
    return NULL;
  }
  fcntl(own, F_SETFL, fcntl(own, F_GETFL) | O_NONBLOCK);
  Channel *c = calloc(1, sizeof(Channel));
  if (c == NULL) {
    close(own);
    napi_throw_error(env, NULL, "fastio: out of memory");
    return NULL;
  }
  c->fd = own;
  c->id = id;
  c->reading = 1;
  uv_loop_t *loop;
  napi_get_uv_event_loop(env, &loop);
  if (uv_poll_init_socket(loop, &c->poll, own) != 0) {
    close(own);
    free(c);
    napi_throw_error(env, NULL, "fastio: poll init failed");
    return NULL;
  }
  c->poll.data = c;
  channels[id] = c;
  update_poll(c);
  napi_value ext;
  napi_create_external(env, c, finalize, NULL, &ext);
  return ext;
}

// Sends what the kernel takes now and queues the rest behind anything already queued: 0 written, 1 queued,
// -errno.
static int send_or_queue(Channel *c, const char *data, size_t len) {
  size_t off = 0;
  if (c->queue_end == c->queue_start) {
    while (off < len) {
      ssize_t n = send(c->fd, data + off, len - off, MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        return -errno;
      }
      off += (size_t)n;
    }
    if (off == len) return 0;
  }
  int r = enqueue(c, data + off, len - off);
  if (r < 0) return r;
  update_poll(c);
  return 1;
}

// write(channel, buffer) -> 0 written, 1 queued, -errno
static napi_value js_write(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  Channel *c = channel_args(env, info, argv, 2);
  if (c == NULL) return NULL;
  if (c->closing) return make_int(env, -EPIPE);
  char *data;
  size_t len;
  if (napi_get_buffer_info(env, argv[1], (void **)&data, &len) != napi_ok) {
    napi_throw_type_error(env, NULL, "fastio.write: expected a Buffer");
    return NULL;
  }
  return make_int(env, send_or_queue(c, data, len));
}

// writev(channel, buffers[]) -> as write; one syscall for what a corked writer collected.
static napi_value js_writev(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  Channel *c = channel_args(env, info, argv, 2);
  if (c == NULL) return NULL;
  if (c->closing) return make_int(env, -EPIPE);
  uint32_t count;
  if (napi_get_array_length(env, argv[1], &count) != napi_ok) {
    napi_throw_type_error(env, NULL, "fastio.writev: expected an array of Buffers");
    return NULL;
  }
  struct iovec iov[MAX_IOV];
  uint32_t first = 0;
  int queued = c->queue_end > c->queue_start;
  while (first < count) {
    uint32_t n = 0;
    size_t total = 0;
    for (; n < MAX_IOV && first + n < count; n++) {
      napi_value item;
      napi_get_element(env, argv[1], first + n, &item);
      if (napi_get_buffer_info(env, item, &iov[n].iov_base, &iov[n].iov_len) != napi_ok) {
        napi_throw_type_error(env, NULL, "fastio.writev: expected an array of Buffers");
        return NULL;
      }
      total += iov[n].iov_len;
    }
    size_t done = 0;
    if (!queued) {
      for (;;) {
        struct msghdr msg = {0};
        msg.msg_iov = iov;
        msg.msg_iovlen = n;
        ssize_t w = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
        if (w < 0) {
          if (errno == EINTR) continue;
          if (errno == EAGAIN || errno == EWOULDBLOCK) break;
          return make_int(env, -errno);
        }
        done = (size_t)w;
        break;
      }
    }
    if (done < total) {
      // Queue what the kernel did not take, and everything after it in order.
      for (uint32_t i = 0; i < n; i++) {
        size_t len = iov[i].iov_len;
        if (done >= len) {
          done -= len;
          continue;
        }
        int r = enqueue(c, (const char *)iov[i].iov_base + done, len - done);
        if (r < 0) return make_int(env, r);
        done = 0;
      }
      queued = 1;
    }
    first += n;
  }
  if (!queued) return make_int(env, 0);
  update_poll(c);
  return make_int(env, 1);
}

// setReading(channel, bool): pause and resume without losing bytes (they stay in the kernel).
static napi_value js_set_reading(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  Channel *c = channel_args(env, info, argv, 2);
  if (c == NULL) return NULL;
  bool on = false;
  napi_get_value_bool(env, argv[1], &on);
  if (!c->closing) {
    c->reading = on ? 1 : 0;
    update_poll(c);
  }
  return NULL;
}

// shutdown(channel): half-closes once the queue is written; returns 0 done now, 1 deferred, -errno.
static napi_value js_shutdown(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  Channel *c = channel_args(env, info, argv, 1);
  if (c == NULL) return NULL;
  if (c->closing) return make_int(env, -EPIPE);
  if (c->queue_end > c->queue_start) {
    c->shutdown_wanted = 1;
    return make_int(env, 1);
  }
  return make_int(env, shutdown(c->fd, SHUT_WR) == 0 ? 0 : -errno);
}

static napi_value js_queued(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  Channel *c = channel_args(env, info, argv, 1);
  if (c == NULL) return NULL;
  return make_int(env, (int)(c->queue_end - c->queue_start));
}

// The memory behind a Buffer or Int32Array argument (kept alive by a reference in batch_refs).
static int shared_memory(napi_env env, napi_value v, int slot, void **data, size_t *len) {
  bool is_buffer = false, is_typed = false;
  napi_is_buffer(env, v, &is_buffer);
  if (is_buffer) {
    if (napi_get_buffer_info(env, v, data, len) != napi_ok) return 0;
  } else {
    napi_is_typedarray(env, v, &is_typed);
    napi_typedarray_type type;
    size_t length;
    if (!is_typed || napi_get_typedarray_info(env, v, &type, &length, data, NULL, NULL) != napi_ok || type != napi_int32_array) return 0;
    *len = length; // elements
  }
  if (batch_refs[slot] != NULL) napi_delete_reference(env, batch_refs[slot]);
  napi_create_reference(env, v, 1, &batch_refs[slot]);
  return *len > 0;
}

// setup(readBuffer, events: Int32Array, outBuffer, outs: Int32Array, onBatch(count)): once, before open().
static napi_value js_setup(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  // Once per process, from the main thread: a second call (or a worker's) would swap buffers under the
  // pointers already in use.
  if (on_batch != NULL) {
    napi_throw_error(env, NULL, "fastio.setup: already set up");
    return NULL;
  }
  void *rb, *ev, *ob, *os;
  size_t rb_len, ev_len, ob_len, os_len;
  if (argc < 5 || !shared_memory(env, argv[0], 0, &rb, &rb_len) || rb_len < 2 * READ_CHUNK || !shared_memory(env, argv[1], 1, &ev, &ev_len) ||
      ev_len < 3 || !shared_memory(env, argv[2], 2, &ob, &ob_len) || !shared_memory(env, argv[3], 3, &os, &os_len) || os_len < 3) {
    napi_throw_type_error(env, NULL, "fastio.setup(readBuffer, events, outBuffer, outs, onBatch)");
    return NULL;
  }
  read_buffer = rb;
  read_buffer_len = rb_len;
  events = ev;
  events_cap = ev_len / 3;
  out_buffer = ob;
  out_buffer_len = ob_len;
  outs = os;
  outs_cap = os_len / 3;
  batch_env = env;
  napi_create_reference(env, argv[4], 1, &on_batch);
  napi_value resource, name;
  napi_create_object(env, &resource);
  napi_create_string_utf8(env, "HeliosSocket", NAPI_AUTO_LENGTH, &name);
  napi_async_init(env, resource, name, &batch_ctx);
  uv_loop_t *loop;
  napi_get_uv_event_loop(env, &loop);
  uv_check_init(loop, &batch_check);
  uv_check_start(&batch_check, on_check);
  uv_unref((uv_handle_t *)&batch_check); // it must not keep the process alive
  return NULL;
}

// flush(count): sends the writes JS collected while handling a batch, each (channel id, offset, length)
// into the out buffer, in order. Each triple's first element is overwritten with its result (0 written,
// 1 queued, -errno, or 2 when the channel had closed), for JS to apply backpressure and errors.
static napi_value js_flush(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uint32_t count = 0;
  if (argc < 1 || napi_get_value_uint32(env, argv[0], &count) != napi_ok || count > outs_cap) {
    napi_throw_type_error(env, NULL, "fastio.flush(count)");
    return NULL;
  }
  for (uint32_t i = 0; i < count; i++) {
    int32_t *o = outs + 3 * i;
    int32_t id = o[0];
    Channel *c = id >= 0 && (size_t)id < channels_cap ? channels[id] : NULL;
    if (c == NULL || c->closing || o[1] < 0 || o[2] < 0 || (size_t)o[1] + (size_t)o[2] > out_buffer_len) {
      o[0] = 2;
      continue;
    }
    o[0] = send_or_queue(c, out_buffer + o[1], (size_t)o[2]);
  }
  return NULL;
}

static napi_value js_close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  Channel *c = channel_args(env, info, argv, 1);
  if (c != NULL) close_channel(c);
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"open", NULL, js_open, NULL, NULL, NULL, napi_default, NULL},
      {"write", NULL, js_write, NULL, NULL, NULL, napi_default, NULL},
      {"writev", NULL, js_writev, NULL, NULL, NULL, napi_default, NULL},
      {"setReading", NULL, js_set_reading, NULL, NULL, NULL, napi_default, NULL},
      {"shutdown", NULL, js_shutdown, NULL, NULL, NULL, napi_default, NULL},
      {"queued", NULL, js_queued, NULL, NULL, NULL, napi_default, NULL},
      {"close", NULL, js_close, NULL, NULL, NULL, napi_default, NULL},
      {"setup", NULL, js_setup, NULL, NULL, NULL, napi_default, NULL},
      {"flush", NULL, js_flush, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
