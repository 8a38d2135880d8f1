"""Wake-up probe for the output clocks of a benchmarked server (docs/performance.md "Clock priority").

Put this folder on ``PYTHONPATH`` of a command that starts ``infer_serv.py`` (``channels_bench.py``
passes its environment on); Python imports ``sitecustomize`` at start-up, and in ``infer_serv.py``
only this wraps ``StreamingController._emit_one`` once the clock module is imported. For every tick
whose predecessor ended before the tick's due time (so any lateness is in waking up, not in our
work) it measures how late the clock thread woke and how much of that the thread spent runnable
but waiting for a core (run delay, ``/proc/self/task/<tid>/schedstat``); the rest is the wait for
the GIL. Every 750 ticks each clock appends one line to ``$WAKEUP_PROBE_DIR/wakeups-<pid>.log``
(default: the system's temporary folder), counting from its 376th tick (start-up left out;
``$WAKEUP_PROBE_SKIP_TICKS`` ticks, default 375):

    wakeups=N run_delay_ms=.. gil_ms=.. worst=[(late_ms, run_delay_ms, due), ...] ge5=.. ge10=.. ge15=.. ge20=..
    long_ticks=.. worst_ticks=[(wall_ms, cpu_ms, start), ...] gc_late=.. steal_late=..
    gc=[(n, total_ms, max_ms) per generation]
    full_gc=[(start, ms, thread name), ...]

and, at once, for every wake-up ``$WAKEUP_PROBE_STACKS_MS`` (default 15) ms or more late and every tick more than half
a frame period late because the previous one ran past its due time (``overrun``), one line per other
thread with its innermost frames as the clock thread got the GIL back: the thread that held the GIL
(or the core) is the one not parked in a wait:

    STACKS late_ms=.. queued_ms=.. steal_ticks=.. kind=wakeup|overrun due=..
      <thread name>: file:line function < file:line function < ...

(``geK``: wake-ups K ms or more late; the two sums and the five worst are over those 5 ms or more
late. ``long_ticks``: ticks whose own work took 20 ms or more, wall time, and the five longest with
the clock thread's CPU time in them: a wall time well over the CPU time is a wait for the GIL or a
core inside the tick. ``gc_late``: of the wake-ups 5 ms or more late, those during which a garbage
collection ran (it holds the GIL); ``gc``: the process's collections since the probe started, by
generation, and the last five full (generation 2) ones; times are ``time.monotonic()``.
``steal_late``: of those wake-ups, those with hypervisor steal time (``/proc/stat``, any vCPU, 10 ms
ticks) since the tick before began: the host, not the guest, may have held the clock up.)

    PYTHONPATH=scripts/bench/wakeup_probe .venv/bin/python scripts/bench/channels_bench.py \\
        --size 832x1248 --duration-s 150 --min-channels 2 --max-channels 2 [stream.clock_nice=0]

A diagnostic for benchmarks only: it reaches into a private method and is never used by the server.
"""

from __future__ import annotations

import builtins
import gc
import os
import sys
import tempfile
import threading
import time

# 15 s at 25 fps: start-up (workers spawning, the heap frozen) is not what is measured
SKIP_TICKS = int(os.environ.get("WAKEUP_PROBE_SKIP_TICKS", "375"))
REPORT_EVERY = 750  # ticks
THRESHOLDS_MS = (5, 10, 15, 20)
LONG_TICK_MS = 20.0
STACKS_AT_MS = float(os.environ.get("WAKEUP_PROBE_STACKS_MS", "15"))  # ms
STACK_DEPTH = 5


def _run_delay_ms(tid: int) -> float:
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e6


def _steal_ticks() -> int:
    """The hypervisor's steal time, all vCPUs, in USER_HZ ticks (``/proc/stat``'s ``cpu`` line, 8th value)."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8])


def _stacks(skip: int) -> list[str]:
    """Every thread's innermost ``STACK_DEPTH`` frames but thread ``skip``'s, one line per thread."""
    names = {t.ident: t.name for t in threading.enumerate()}
    lines = []
    for ident, frame in sys._current_frames().items():
        if ident == skip:
            continue
        parts = []
        while frame is not None and len(parts) < STACK_DEPTH:
            code = frame.f_code
            parts.append(f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}")
            frame = frame.f_back
        lines.append(f"  {names.get(ident, ident)}: {' < '.join(parts)}")
    return lines


def _install() -> None:
    from latentsync.serving.playout import clock

    emit = clock.StreamingController._emit_one
    folder = os.environ.get("WAKEUP_PROBE_DIR") or tempfile.gettempdir()
    out = open(os.path.join(folder, f"wakeups-{os.getpid()}.log"), "a", buffering=1)  # noqa: SIM115 - process-long
    lock = threading.Lock()
    collections = {"start": 0.0, "last_end": 0.0, "gens": [[0, 0.0, 0.0] for _ in range(3)], "full": []}

    def timed_collection(phase: str, info: dict) -> None:
        now = time.monotonic()
        if phase == "start":
            collections["start"] = now
            return
        ms = (now - collections["start"]) * 1000
        gen = collections["gens"][info["generation"]]
        gen[0], gen[1], gen[2] = gen[0] + 1, gen[1] + ms, max(gen[2], ms)
        collections["last_end"] = now
        if info["generation"] == 2:  # when, how long, in which thread, the last five
            full = (round(collections["start"], 3), round(ms, 1), threading.current_thread().name)
            collections["full"] = [*collections["full"], full][-5:]

    gc.callbacks.append(timed_collection)

    def probed(self) -> None:
        start = time.monotonic()
        tid = threading.get_native_id()
        due = self._t0 + self._ticks / self._fps
        run_delay = _run_delay_ms(tid)
        steal = _steal_ticks()
        st = self.__dict__.setdefault(
            "_wakeup_probe",
            {"end": None, "run_delay": 0.0, "wakeups": 0, "run_delay_ms": 0.0, "gil_ms": 0.0, "worst": []}
            | {f"ge{k}": 0 for k in THRESHOLDS_MS}
            | {"long_ticks": 0, "worst_ticks": [], "gc_late": 0, "steal_late": 0, "steal": steal},
        )
        late_ms = (start - due) * 1000
        queued_ms = run_delay - st["run_delay"]
        stolen, st["steal"] = steal - st["steal"], steal  # since the previous tick began
        if st["end"] is not None and self._ticks > SKIP_TICKS:
            woke = st["end"] < due
            if late_ms >= (STACKS_AT_MS if woke else clock.LATE_FRACTION * 1000.0 / self._fps):
                kind = "wakeup" if woke else "overrun"
                head = (
                    f"STACKS late_ms={late_ms:.1f} queued_ms={queued_ms:.1f} steal_ticks={stolen} "
                    f"kind={kind} due={due:.3f}"
                )
                lines = _stacks(threading.get_ident())
                with lock:
                    out.write("\n".join([f"{time.time():.3f} tid={tid} {head}", *lines]) + "\n")
            if woke:  # the predecessor ended in time: any lateness is in waking up
                st["wakeups"] += 1
                for k in THRESHOLDS_MS:
                    st[f"ge{k}"] += late_ms >= k
                if late_ms >= THRESHOLDS_MS[0]:
                    st["gc_late"] += collections["last_end"] > due
                    st["steal_late"] += stolen > 0
                    st["run_delay_ms"] += queued_ms
                    st["gil_ms"] += max(0.0, late_ms - queued_ms)
                    st["worst"] = sorted([*st["worst"], (round(late_ms, 1), round(queued_ms, 1), round(due, 3))])[-5:]
        cpu = time.thread_time()
        emit(self)
        st["end"], st["run_delay"] = time.monotonic(), _run_delay_ms(tid)
        wall_ms = (st["end"] - start) * 1000
        if wall_ms >= LONG_TICK_MS and self._ticks > SKIP_TICKS:
            cpu_ms = (time.thread_time() - cpu) * 1000
            st["long_ticks"] += 1
            long_tick = (round(wall_ms, 1), round(cpu_ms, 1), round(start, 3))
            st["worst_ticks"] = sorted([*st["worst_ticks"], long_tick])[-5:]
        if self._ticks % REPORT_EVERY == 0:
            shown = {k: v for k, v in st.items() if k not in ("end", "run_delay", "steal")}
            shown["gc"] = [(n, round(total, 1), round(worst, 1)) for n, total, worst in collections["gens"]]
            shown["full_gc"] = collections["full"]
            fields = " ".join(f"{k}={round(v, 1) if isinstance(v, float) else v}" for k, v in shown.items())
            with lock:
                out.write(f"{time.time():.3f} tid={tid} {fields}\n")

    clock.StreamingController._emit_one = probed


def _hook() -> None:
    original = builtins.__import__
    done = []

    def importing(name, *args, **kwargs):
        module = original(name, *args, **kwargs)
        clock = sys.modules.get("latentsync.serving.playout.clock")
        if not done and hasattr(clock, "StreamingController"):  # imported, and no longer half-initialised
            done.append(True)
            builtins.__import__ = original
            _install()
        return module

    builtins.__import__ = importing


if os.path.basename(sys.argv[0]) == "infer_serv.py":
    _hook()
