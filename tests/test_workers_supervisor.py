"""The master's supervision decisions on a Clock (lbtwist.workers.supervisor)."""
from twisted.internet.task import Clock

from lbtwist.workers.supervisor import Supervisor


class Effects:
    def __init__(self):
        self.spawned = []  # (wid, slot)
        self.killed = []
        self.logs = []
        self.next = 100

    def spawn(self, slot):
        self.next += 1
        self.spawned.append((self.next, slot))
        return self.next

    def kill(self, wid, why):
        self.killed.append((wid, why))


def make(slots=2, **kw):
    clock, fx = Clock(), Effects()
    sup = Supervisor(clock, slots, fx.spawn, fx.kill, log=fx.logs.append, **kw)
    sup.start()
    return clock, fx, sup


def test_start_fills_every_slot():
    clock, fx, sup = make(3)
    assert [s for _, s in fx.spawned] == [0, 1, 2]
    assert [r.slot for r in sup.live()] == [0, 1, 2]


def test_dead_worker_replaced_at_once_others_untouched():
    clock, fx, sup = make(2)
    (w1, _), (w2, _) = fx.spawned
    assert sup.exited(w1, "killed by signal 9") == 0.0
    clock.advance(0)
    assert fx.spawned[-1][1] == 0 and len(fx.spawned) == 3
    assert sup.current[1] == w2 and fx.killed == []
    assert "killed by signal 9" in fx.logs[-1]


def test_crash_loop_backs_off_and_keeps_other_slot():
    clock, fx, sup = make(2, burst=3, window=10.0, backoff=1.0)
    delays = []
    for _ in range(5):
        wid = sup.current[0]
        delays.append(sup.exited(wid, "exit code 1"))
        clock.advance(delays[-1])
    assert delays == [0.0, 0.0, 1.0, 2.0, 4.0]
    assert "crash loop" in fx.logs[-1]
    assert sup.current[1] == fx.spawned[1][0]  # slot 1 never restarted
    # quiet for longer than the window: back to immediate replacement
    clock.advance(11)
    assert sup.exited(sup.current[0], "exit code 1") == 0.0


def test_backoff_is_capped():
    clock, fx, sup = make(1, burst=1, backoff=1.0, backoff_max=5.0, window=100.0)
    for _ in range(6):
        d = sup.exited(sup.current[0], "x")
        clock.advance(d)
    assert d == 5.0


def test_silent_worker_killed_after_timeout_once():
    clock, fx, sup = make(2, heartbeat_timeout=5.0)
    (w1, _), (w2, _) = fx.spawned
    sup.heard(w1)
    for _ in range(9):
        clock.advance(0.5)
        sup.heard(w2)  # only w2 answers
        assert sup.tick() == []
    clock.advance(0.5)
    assert sup.tick() == [w1]
    assert fx.killed[0][0] == w1 and "no heartbeat" in fx.killed[0][1]
    clock.advance(0.5)
    assert sup.tick() == []  # killed once; its exit replaces it
    sup.exited(w1, "killed by signal 9")
    clock.advance(0)
    assert sup.current[0] not in (None, w1)


def test_retired_worker_exit_not_replaced():
    clock, fx, sup = make(2)
    (w1, _), _ = fx.spawned
    old, new = sup.replace(0)
    assert old == w1 and sup.current[0] == new
    n = len(fx.spawned)
    assert sup.exited(w1, "exit code 0") is None
    clock.advance(1)
    assert len(fx.spawned) == n and sup.current[0] == new


def test_stop_cancels_pending_respawns():
    clock, fx, sup = make(1, burst=1, backoff=2.0)
    assert sup.exited(sup.current[0], "x") == 2.0
    sup.stop()
    clock.advance(10)
    assert len(fx.spawned) == 1
    assert sup.exited(12345, "unknown") is None


def test_startup_gets_its_own_timeout():
    clock, fx, sup = make(1, heartbeat_timeout=5.0, startup_timeout=20.0)
    clock.advance(19)
    assert sup.tick() == []
    clock.advance(1)
    assert sup.tick() == [fx.spawned[0][0]] and "first answer" in fx.killed[0][1]
