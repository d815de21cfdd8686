# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The layout of a client's windows file and every read and write of it (``appliance.policy.windows`` maps the file).

Compiled (Cython), because this is a limited client's check on every request: interpreted, the check, its count and its
charge cost a live proxy worker about 6 us of a request's 110-130 us of CPU; compiled, a few hundred ns
(bench/RESULTS.md). The file is an array of int64 words: a header, then one region per worker slot. Each worker
writes only its own region; a check reads every region in use, with no lock.
"""

from appliance.shared.hostload import SLOTS

WINDOW_S = 60
DAY_S = 86400
#: ``Regions.admit``'s refusals: the client has ``max_concurrent`` requests in flight; a window or the day is full.
BUSY = 0
FULL = 1

# The header: the day (days since the epoch) of the tokens the regions do not hold (from the ledger: before a reboot,
# or while the client had no limits), and those tokens. A region: the newest second its ring holds, the totals of its
# ring, a spare word (older versions wrote a second there), its newest second with a token, its day and the day's
# tokens, its requests in flight; then the ring, 60 times (second, requests, tokens).
cdef enum:
    _WINDOW = 60
    _DAY = 86400
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

#: The file's size in bytes.
SIZE = 8 * (_HEADER + SLOTS * _REGION)
cdef Py_ssize_t _SLOTS = SLOTS


cdef inline Py_ssize_t _bucket(Py_ssize_t region, long long second) noexcept nogil:
    return region + _RING + 3 * (second % _WINDOW)


cdef class Regions:
    """One worker's view of a client's file: it writes the region of its slot, and reads every region in use."""

    cdef long long[::1] _v
    cdef Py_ssize_t _own
    cdef object _high

    def __init__(self, words, Py_ssize_t slot, high):
        """``words``: the file, as int64 words; ``high``: the number of slots ever claimed (the live workers' are
        below it)."""
        self._v = words
        # The checks below index the file unchecked: the slot and the file's size are checked once, here.
        if self._v.shape[0] < _HEADER + _SLOTS * _REGION or not 0 <= slot < SLOTS:
            raise ValueError(f"slot {slot} of a {self._v.shape[0]}-word windows file")
        self._own = _HEADER + slot * _REGION
        self._high = high
        self._v[self._own + _IN_FLIGHT] = 0  # a dead worker's, before this one claimed the slot

    def raise_day_base(self, long long today, long long seen):
        """The day's tokens become at least ``seen`` (the usage ledger's count): the header holds what the regions
        do not."""
        cdef long long[::1] v = self._v
        cdef long long held = 0, base
        cdef Py_ssize_t r
        for r in range(_HEADER, _HEADER + _SLOTS * _REGION, _REGION):
            if v[r + _REGION_DAY] == today:
                held += v[r + _DAY_TOKENS]
        base = v[_BASE_TOKENS] if v[_BASE_DAY] == today else 0
        v[_BASE_DAY] = today
        v[_BASE_TOKENS] = max(base, seen - held)

    cdef Py_ssize_t _advance(self, long long second):
        """Move this worker's region to ``second``: the seconds that left the window leave its totals (at most 60
        steps, none within the same second). The ring index of the current second."""
        cdef long long[::1] v = self._v
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

    cdef void _totals(self, long long second, long long* out):
        """The window's requests and tokens over every region, the day's tokens, the newest second with a token, and
        the requests in flight, into ``out``."""
        cdef long long[::1] v = self._v
        cdef Py_ssize_t high = min(<Py_ssize_t>self._high(), _SLOTS), r, i
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

    def admit(self, double now, long long concurrent, long long requests, long long tokens, long long day):
        """Count this request, in flight and in the window, unless the client has ``concurrent`` requests in flight
        (``BUSY``), or the window ``requests`` requests or ``tokens`` tokens, or the day ``day`` tokens (``FULL``); 0:
        no such limit. Else the window's requests (this one included) and tokens, and when its newest token leaves it.
        ``leave`` ends the request."""
        cdef long long[::1] v = self._v
        cdef long long second = <long long>now
        cdef Py_ssize_t i = self._advance(second)
        cdef long long t[5]
        self._totals(second, t)
        if concurrent and t[4] >= concurrent:
            return BUSY
        if (requests and t[0] >= requests) or (tokens and t[1] >= tokens) or (day and t[2] >= day):
            return FULL
        v[i + 1] += 1
        v[self._own + _REQUESTS] += 1
        v[self._own + _IN_FLIGHT] += 1
        return t[0] + 1, t[1], t[3] + _WINDOW if t[1] else now

    def leave(self):
        self._v[self._own + _IN_FLIGHT] -= 1

    def undo(self, double at):
        """Uncount a request admitted at ``at`` that was then refused (the host's queue was full); ``leave`` still
        ends it."""
        cdef long long[::1] v = self._v
        cdef long long second = <long long>at
        cdef Py_ssize_t i = _bucket(self._own, second)
        if v[i] == second and v[i + 1] > 0:
            v[i + 1] -= 1
            v[self._own + _REQUESTS] -= 1

    def charge(self, long long tokens, double now):
        cdef long long[::1] v = self._v
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

    def snapshot(self, double now):
        """The windows now, all of them: the window's requests and tokens, the day's tokens, the newest second with a
        request and with a token, and the seconds in the window, oldest first (second, requests, tokens)."""
        cdef long long[::1] v = self._v
        cdef long long second = <long long>now, last_request = 0
        cdef long long t[5]
        cdef Py_ssize_t r, i
        self._advance(second)
        self._totals(second, t)
        merged = {}
        for r in range(_HEADER, _HEADER + min(<Py_ssize_t>self._high(), _SLOTS) * _REGION, _REGION):
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
        if v.shape[0] < _HEADER + _SLOTS * _REGION or not 0 <= slot < SLOTS:
            raise ValueError(f"slot {slot} of a {v.shape[0]}-word windows file")
        v[_HEADER + <Py_ssize_t>slot * _REGION + _IN_FLIGHT] = 0
