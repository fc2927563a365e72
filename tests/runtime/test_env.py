"""free_port: rendezvous ports come from below the kernel's ephemeral range, where outgoing connections never
take them, and from that range itself only when there is no room below it."""

from __future__ import annotations

import socket

from trainer.runtime import env


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_ports_are_drawn_below_the_ephemeral_range(tmp_path, monkeypatch):
    (tmp_path / "range").write_text("40000\t60999\n")
    monkeypatch.setattr(env, "EPHEMERAL_RANGE", tmp_path / "range")
    ports = {env.free_port() for _ in range(20)}
    assert all(40000 - env.RENDEZVOUS_PORTS <= p < 40000 and _bindable(p) for p in ports)
    assert len(ports) > 1  # drawn at random, not the same port for every caller


def test_a_port_in_use_is_not_given(tmp_path, monkeypatch):
    (tmp_path / "range").write_text("40000 60999")
    monkeypatch.setattr(env, "EPHEMERAL_RANGE", tmp_path / "range")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        free = next(p for p in range(39999, 28000, -1) if _bindable(p))
        draws = iter([busy, busy, free])  # the draw's sequence, so that the busy port comes first

        class Draws:
            def randrange(self, _low, _high):
                return next(draws)

        monkeypatch.setattr(env.random, "SystemRandom", Draws)
        assert env.free_port() == free


def test_no_room_below_the_range_falls_back_to_the_kernels_choice(tmp_path, monkeypatch):
    (tmp_path / "range").write_text("1500 60999")
    monkeypatch.setattr(env, "EPHEMERAL_RANGE", tmp_path / "range")
    assert _bindable(env.free_port())


def test_an_unreadable_range_assumes_linuxs_default(tmp_path, monkeypatch):
    monkeypatch.setattr(env, "EPHEMERAL_RANGE", tmp_path / "absent")
    assert 32768 - env.RENDEZVOUS_PORTS <= env.free_port() < 32768
