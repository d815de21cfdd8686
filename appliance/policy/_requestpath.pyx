# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""What a limited client's request runs (``appliance.policy.gate``): the check and count in its windows file
(``Regions``: the file's layout and every read and write of it; ``appliance.policy.windows`` maps the file), its
rate-limit header fields (``RateFields``), and the admission that ends it (``Admission``). The proxy makes one call into
it as a request starts and one as it ends (``Limits.enter``, ``Limits.charge``), which also find the client.

Compiled (Cython), because it runs on every request of a limited client, in a worker whose caches are cold for code
that runs once per request: there a call costs several times what it costs in a loop. Interpreted, the gate took 3.4 us
a request in a loop, and the policies 6-9 % of the throughput, more than the 5 % they may take. With the windows and
fields compiled but reached through the interpreter (the gate's Python methods, method calls by name, a
``PyBytes_FromFormat``), 1.06 us in a loop and 5-6 us of a live worker's time. As one compiled call each way, with
nothing on the way that the interpreter dispatches, 0.45 us in a loop and about 0.5 us in a live worker
(bench/RESULTS.md).

The windows file is an array of int64 words: a header, then one region per worker slot. Each worker writes only its
own region; a check reads every region in use, with no lock.
"""

import math
import time

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.math cimport ceil
from libc.string cimport memcpy
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

from appliance.shared.hostload import SLOTS

cdef enum:
    _BUSY = 0
    _FULL = 1
    _WINDOW = 60
    _DAY = 86400

# The file, in int64 words. The header: the day (days since the epoch) of the tokens the regions do not hold (from the
# ledger: before a reboot, or while the client had no limits), and those tokens. A region: the newest second its ring
# holds, the totals of its ring, a spare word (older versions wrote a second there), its newest second with a token,
# its day and the day's tokens, its requests in flight; then the ring, 60 times (second, requests, tokens).
cdef enum:
    _BASE_DAY = 0
    _BASE_TOKENS = 1
    _HEADER = 8
    _NOW = 0
    _REQUESTS = 1
    _TOKENS = 2
    _LAST_TOKEN = 4
    _REGION_DAY = 5
    _DAY_TOKENS = 6
    _IN_FLIGHT = 7
    _RING = 8
    _REGION = 8 + 3 * 60

WINDOW_S = _WINDOW
DAY_S = _DAY
#: ``Regions.admit``'s and ``Client.enter``'s refusals: the client has ``max_concurrent`` requests in flight; a window
#: or the day is full.
BUSY = _BUSY
FULL = _FULL
#: The file's size in bytes.
SIZE = 8 * (_HEADER + SLOTS * _REGION)
cdef Py_ssize_t _SLOTS = SLOTS


cdef Py_ssize_t _region(long long[::1] v, Py_ssize_t slot) except -1:
    """The first word of ``slot``'s region. The checks index the file unchecked: the slot and the file's size are
    checked here, once per mapping."""
    if v.shape[0] < _HEADER + _SLOTS * _REGION or not 0 <= slot < _SLOTS:
        raise ValueError(f"slot {slot} of a {v.shape[0]}-word windows file")
    return _HEADER + slot * _REGION


cdef inline Py_ssize_t _bucket(Py_ssize_t region, long long second) noexcept nogil:
    return region + _RING + 3 * (second % _WINDOW)


cdef inline double _now() noexcept nogil:
    """``time.time()``, without a call through the interpreter."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef class Regions:
    """One worker's view of a client's file: it writes the region of its slot, and reads every region in use."""

    #: The file, held; the request path reads and writes it through ``_p`` (a memoryview slice counts its every copy).
    cdef long long[::1] _v
    cdef long long* _p
    cdef Py_ssize_t _own
    cdef object _high

    def __init__(self, words, Py_ssize_t slot, high):
        """``words``: the file, as int64 words; ``high``: the number of slots ever claimed (the live workers' are
        below it)."""
        self._v = words
        self._own = _region(self._v, slot)
        self._p = &self._v[0]
        self._high = high
        self._p[self._own + _IN_FLIGHT] = 0  # a dead worker's, before this one claimed the slot

    def raise_day_base(self, long long today, long long seen):
        """The day's tokens become at least ``seen`` (the usage ledger's count): the header holds what the regions
        do not."""
        cdef long long* v = self._p
        cdef long long held = 0, base
        cdef Py_ssize_t r
        for r in range(_HEADER, _HEADER + _SLOTS * _REGION, _REGION):
            if v[r + _REGION_DAY] == today:
                held += v[r + _DAY_TOKENS]
        base = v[_BASE_TOKENS] if v[_BASE_DAY] == today else 0
        v[_BASE_DAY] = today
        v[_BASE_TOKENS] = max(base, seen - held)

    cdef Py_ssize_t _advance(self, long long second) noexcept:
        """Move this worker's region to ``second``: the seconds that left the window leave its totals (at most 60
        steps, none within the same second). The ring index of the current second."""
        cdef long long* v = self._p
        cdef Py_ssize_t r = self._own, i
        cdef long long s
        if second > v[r + _NOW]:
            for s in range(max(v[r + _NOW] + 1, second - _WINDOW + 1), second + 1):
                i = _bucket(r, s)
                v[r + _REQUESTS] -= v[i + 1]
                v[r + _TOKENS] -= v[i + 2]
                v[i] = s
                v[i + 1] = 0
                v[i + 2] = 0
            v[r + _NOW] = second
        # A clock set back counts in the newest second the region holds.
        return _bucket(r, v[r + _NOW])

    cdef Py_ssize_t _in_use(self) except -1:
        """The slots in use: those ever claimed, no more than the file has."""
        return min(<Py_ssize_t>self._high(), _SLOTS)

    cdef int _totals(self, long long second, long long* out) except -1:
        """The window's requests and tokens over every region, the day's tokens, the newest second with a token, and
        the requests in flight, into ``out``."""
        cdef long long* v = self._p
        cdef Py_ssize_t high = self._in_use(), r, i
        cdef long long requests = 0, tokens = 0, last_token = 0, in_flight = 0, held, req, tok, s
        cdef long long today = second // _DAY, oldest = second - _WINDOW
        cdef long long day = v[_BASE_TOKENS] if v[_BASE_DAY] == today else 0
        for r in range(_HEADER, _HEADER + high * _REGION, _REGION):
            in_flight += v[r + _IN_FLIGHT]
            held = v[r + _NOW]
            if held > oldest:
                req = v[r + _REQUESTS]
                tok = v[r + _TOKENS]
                if held < second:  # a region not moved this second may hold seconds that have left the window
                    for s in range(held - _WINDOW + 1, oldest + 1):
                        i = _bucket(r, s)
                        if v[i] == s:
                            req -= v[i + 1]
                            tok -= v[i + 2]
                requests += req
                if tok:
                    tokens += tok
                    if v[r + _LAST_TOKEN] > last_token:
                        last_token = v[r + _LAST_TOKEN]
            if v[r + _REGION_DAY] == today:
                day += v[r + _DAY_TOKENS]
        out[0], out[1], out[2], out[3], out[4] = requests, tokens, day, last_token, in_flight
        return 0

    cdef int _count(self, double now, long long concurrent, long long requests, long long tokens, long long day,
                    long long* out) except -2:
        """``admit``: -1 with the window's requests, its tokens and its newest second with a token in ``out``, or a
        refusal."""
        cdef long long* v = self._p
        cdef long long second = <long long>now
        cdef Py_ssize_t i = self._advance(second)
        cdef long long t[5]
        self._totals(second, t)
        if concurrent and t[4] >= concurrent:
            return _BUSY
        if (requests and t[0] >= requests) or (tokens and t[1] >= tokens) or (day and t[2] >= day):
            return _FULL
        v[i + 1] += 1
        v[self._own + _REQUESTS] += 1
        v[self._own + _IN_FLIGHT] += 1
        out[0], out[1], out[2] = t[0] + 1, t[1], t[3]
        return -1

    def admit(self, double now, long long concurrent, long long requests, long long tokens, long long day):
        """Count this request, in flight and in the window, unless the client has ``concurrent`` requests in flight
        (``BUSY``), or the window ``requests`` requests or ``tokens`` tokens, or the day ``day`` tokens (``FULL``); 0:
        no such limit. Else the window's requests (this one included) and tokens, and when its newest token leaves it.
        ``leave`` ends the request."""
        cdef long long t[3]
        cdef int refused = self._count(now, concurrent, requests, tokens, day, t)
        if refused >= 0:
            return refused
        return t[0], t[1], t[2] + _WINDOW if t[1] else now

    def leave(self):
        self._leave()

    def undo(self, double at):
        """Uncount a request admitted at ``at`` that was then refused (the host's queue was full); ``leave`` still
        ends it."""
        self._undo(at)

    def charge(self, long long tokens, double now):
        self._charge(tokens, now)

    cdef inline void _leave(self) noexcept:
        self._p[self._own + _IN_FLIGHT] -= 1

    cdef void _undo(self, double at) noexcept:
        cdef long long* v = self._p
        cdef long long second = <long long>at
        cdef Py_ssize_t i = _bucket(self._own, second)
        if v[i] == second and v[i + 1] > 0:
            v[i + 1] -= 1
            v[self._own + _REQUESTS] -= 1

    cdef int _charge(self, long long tokens, double now) except -1:
        cdef long long* v = self._p
        cdef Py_ssize_t r = self._own
        cdef long long second = <long long>now
        cdef Py_ssize_t i = self._advance(second)
        v[i + 2] += tokens
        v[r + _TOKENS] += tokens
        v[r + _LAST_TOKEN] = v[i]
        if v[r + _REGION_DAY] != second // _DAY:
            v[r + _REGION_DAY] = second // _DAY
            v[r + _DAY_TOKENS] = 0
        v[r + _DAY_TOKENS] += tokens
        return 0

    def snapshot(self, double now):
        """The windows now, all of them: the window's requests and tokens, the day's tokens, the newest second with a
        request and with a token, and the seconds in the window, oldest first (second, requests, tokens)."""
        cdef long long* v = self._p
        cdef long long second = <long long>now, last_request = 0
        cdef long long t[5]
        cdef Py_ssize_t r, i
        self._advance(second)
        self._totals(second, t)
        merged = {}
        for r in range(_HEADER, _HEADER + self._in_use() * _REGION, _REGION):
            for i in range(r + _RING, r + _REGION, 3):
                if second - _WINDOW < v[i] <= second and (v[i + 1] or v[i + 2]):
                    b = merged.setdefault(v[i], [0, 0])
                    b[0] += v[i + 1]
                    b[1] += v[i + 2]
                    if v[i + 1]:
                        last_request = max(last_request, v[i])
        return (t[0], t[1], t[2], last_request, t[3],
                sorted([(s, b[0], b[1]) for s, b in merged.items()]))


def zero_in_flight(words, slots):
    """Zero the requests in flight of ``slots`` in one client's file (their workers are gone)."""
    cdef long long[::1] v = words
    for slot in slots:
        v[_region(v, slot) + _IN_FLIGHT] = 0


cdef str _duration(seconds):
    """OpenAI's form of a reset time: ``6m0s``, ``59s``."""
    s = max(0, math.ceil(seconds))
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


#: The headers' names: OpenAI's, and Anthropic's on its routes; for requests, then tokens.
_NAMES = {
    False: ((b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests"),
            (b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens")),
    True: ((b"anthropic-ratelimit-requests-limit", b"anthropic-ratelimit-requests-remaining",
            b"anthropic-ratelimit-requests-reset"),
           (b"anthropic-ratelimit-tokens-limit", b"anthropic-ratelimit-tokens-remaining",
            b"anthropic-ratelimit-tokens-reset")),
}
#: OpenAI's reset durations within a window, by whole seconds.
cdef tuple _DURATIONS = tuple([_duration(s).encode() for s in range(WINDOW_S + 1)])


#: An admitted request's fields fit in a buffer of this size: ``RateFields`` refuses longer pieces.
cdef enum:
    _FIELDS_MAX = 512


cdef inline Py_ssize_t _put(char* out, Py_ssize_t n, bytes piece) noexcept:
    cdef Py_ssize_t size = PyBytes_GET_SIZE(piece)
    memcpy(out + n, PyBytes_AS_STRING(piece), size)
    return n + size


cdef inline Py_ssize_t _digits(char* out, Py_ssize_t n, long long value) noexcept:
    """``value`` in decimal, 0 for anything lower (an admitted request's counts are within their limits)."""
    cdef char reverse[20]
    cdef int k = 0
    if value <= 0:
        out[n] = c'0'
        return n + 1
    while value:
        reverse[k] = c'0' + value % 10
        value //= 10
        k += 1
    while k:
        k -= 1
        out[n] = reverse[k]
        n += 1
    return n


cdef class RateFields:
    """A client's rate-limit header fields: OpenAI's ``x-ratelimit-*``, or Anthropic's ``anthropic-ratelimit-*`` on
    its routes. What is left of the minute's requests and tokens after this request, and when each is whole again (a
    duration for OpenAI, a time for Anthropic).

    Rendered raw, for the response head (``appliance.proxy.protocol.CoalescedTransport.head_fields``): through Falcon
    and uvicorn, which encode and check every header one by one, six headers cost a limited client's request more than
    all its policy's checks."""

    cdef bint _anthropic
    cdef long long _requests, _tokens
    #: The fields with the values left to fill in (``%``): the remaining requests and their reset, the remaining
    #: tokens and their reset (those of the limits the client has).
    cdef bytes _template
    #: The same for an admitted request of an OpenAI route, in pieces to copy around the numbers: up to the remaining
    #: requests, from there to the remaining tokens (the requests' reset filled in: the window is whole again in 60
    #: s), from there to the tokens' reset.
    cdef bytes _before_requests, _before_tokens, _before_reset
    #: Anthropic's reset times, by second: a strftime costs more than the rest of the rendering.
    cdef dict _times

    def __init__(self, long long requests, long long tokens, bint anthropic):
        self._anthropic = anthropic
        self._requests = requests
        self._tokens = tokens
        self._template = b""
        self._times = {}
        for limit, (name, remaining, reset) in zip((requests, tokens), _NAMES[anthropic], strict=True):
            if limit:
                self._template += b"%s: %d\r\n%s: %%d\r\n%s: %%s\r\n" % (name, limit, remaining, reset)
        if not anthropic:  # Anthropic's admitted fields are rendered from the template
            self._pieces(requests, tokens)

    cdef _pieces(self, long long requests, long long tokens):
        (name, remaining, reset), (tname, tremaining, treset) = _NAMES[False]
        self._before_requests = b"%s: %d\r\n%s: " % (name, requests, remaining) if requests else b""
        self._before_tokens = b"\r\n%s: %s" % (reset, _DURATIONS[WINDOW_S]) if requests else b""
        if tokens:
            self._before_tokens += (b"\r\n" if requests else b"") + b"%s: %d\r\n%s: " % (tname, tokens, tremaining)
        self._before_reset = b"\r\n%s: " % treset
        if len(self._before_requests) + len(self._before_tokens) + len(self._before_reset) + 64 > _FIELDS_MAX:
            raise ValueError(f"rate-limit fields over {_FIELDS_MAX} bytes")

    def render(self, requests, requests_reset_at, tokens, tokens_reset_at, now):
        """The fields for a window with ``requests`` requests and ``tokens`` tokens (b"" without either limit)."""
        if self._requests and self._tokens:
            return self._template % (max(0, self._requests - requests), self._reset(requests_reset_at, now),
                                     max(0, self._tokens - tokens), self._reset(tokens_reset_at, now))
        if self._requests:
            return self._template % (max(0, self._requests - requests), self._reset(requests_reset_at, now))
        if self._tokens:
            return self._template % (max(0, self._tokens - tokens), self._reset(tokens_reset_at, now))
        return b""

    cdef bytes admitted(self, long long requests, long long tokens, double tokens_reset_at, double now):
        """``render`` for an admitted request, the newest in the window: the requests' window is whole again 60 s
        from now. The OpenAI routes' case is the one that matters most: pieces and digits copied into one buffer."""
        cdef char out[_FIELDS_MAX]
        cdef Py_ssize_t n = 0
        if self._anthropic:
            return self.render(requests, int(now) + WINDOW_S, tokens, tokens_reset_at, now)
        if self._requests:
            n = _put(out, n, self._before_requests)
            n = _digits(out, n, self._requests - requests)
        if self._tokens:
            n = _put(out, n, self._before_tokens)
            n = _digits(out, n, self._tokens - tokens)
            n = _put(out, n, self._before_reset)
            # The newest token's second is within the last 60 s: its reset is at most 60 s away.
            n = _put(out, n, _DURATIONS[max(0, min(_WINDOW, <long>ceil(tokens_reset_at - now)))])
        elif self._requests:
            n = _put(out, n, self._before_tokens)
        else:
            return b""
        out[n], out[n + 1] = c'\r', c'\n'
        return PyBytes_FromStringAndSize(out, n + 2)

    def _reset(self, at, now):
        if self._anthropic:
            second = math.ceil(at)
            text = self._times.get(second)
            if text is None:
                if len(self._times) > 2 * WINDOW_S:
                    self._times.clear()
                text = self._times[second] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second)).encode()
            return text
        s = max(0, math.ceil(at - now))
        return _DURATIONS[s] if s <= WINDOW_S else _duration(s).encode()


@cython.freelist(32)
cdef class Admission:
    """A request let through by its client's policy, counted in flight until ``leave``."""

    cdef Regions _window
    #: When it was admitted.
    cdef readonly double at
    #: The rate-limit header fields, raw for the response head (``RateFields``).
    cdef readonly bytes head

    def leave(self):
        """The request is over (once: later calls do nothing)."""
        if self._window is not None:
            self._window._leave()
            self._window = None

    def undo(self):
        """The request was refused after all (the model's queue on the host was full): it does not count."""
        if self._window is not None:
            self._window._undo(self.at)
            self.leave()


cdef class Client:
    """A client with a limit, as the request path reads its policy (``clients.<section>``)."""

    cdef readonly str section
    cdef readonly long long concurrent, requests, tokens, day
    #: Its header fields: OpenAI's (index False), Anthropic's (True).
    cdef readonly tuple fields
    #: Its requests in flight, its windows and its day (``appliance.policy.gate.Gate.start``).
    cdef public Regions window

    def __init__(self, str section, long long concurrent, long long requests, long long tokens, long long day):
        self.section = section
        self.concurrent, self.requests, self.tokens, self.day = concurrent, requests, tokens, day
        self.fields = (RateFields(requests, tokens, False), RateFields(requests, tokens, True))

    def enter(self, double now, bint anthropic):
        """Admit one request at ``now``, counted and with its header fields, or refuse it (``BUSY``, ``FULL``)."""
        return self._enter(now, anthropic)

    def charge(self, long long tokens, double now):
        """Count a finished request's tokens in the windows (this worker's region: no lock)."""
        self._charge(tokens, now)

    cdef object _enter(self, double now, bint anthropic):
        cdef long long t[3]
        cdef int refused
        cdef Admission admission
        if self.window is None:
            raise RuntimeError(f"clients.{self.section}: its windows file is not mapped (Gate.start)")
        refused = self.window._count(now, self.concurrent, self.requests, self.tokens, self.day, t)
        if refused >= 0:
            return refused
        admission = Admission.__new__(Admission)
        admission._window = self.window
        admission.at = now
        admission.head = (<RateFields>self.fields[anthropic]).admitted(t[0], t[1], t[2] + _WINDOW if t[1] else now,
                                                                        now)
        return admission

    cdef int _charge(self, long long tokens, double now) except -1:
        if self.window is not None and tokens > 0:
            self.window._charge(tokens, now)
        return 0


cdef class Limits:
    """The clients with a limit, by key name: what the request path calls for every request, one call each way (a
    client without limits costs a dictionary lookup)."""

    cdef dict _clients
    cdef object _refuse

    def __init__(self, dict clients, refuse):
        """``clients``: ``Client`` by key name; ``refuse(client, BUSY or FULL, now, anthropic)``: the answer to a
        refused request."""
        self._clients = clients
        self._refuse = refuse

    def enter(self, str client, bint anthropic):
        """Admit one request of ``client`` now (an ``Admission``), or ``refuse``'s answer; None: it has no limits."""
        found = self._clients.get(client)
        if found is None:
            return None
        cdef double now = _now()
        admitted = (<Client>found)._enter(now, anthropic)
        if type(admitted) is Admission:
            return admitted
        return self._refuse(client, admitted, now, anthropic)

    def charge(self, str client, long long tokens):
        """Count a finished request's tokens in its client's windows."""
        found = self._clients.get(client)
        if found is not None:
            (<Client>found)._charge(tokens, _now())
