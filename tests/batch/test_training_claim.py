"""The claim on training a style's network: one holder, kept by heartbeat, taken over only when stale."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from nst_batch.batch.training_claim import TrainingClaim


def test_one_holder_a_stale_claim_is_taken_over_and_release_removes_only_ones_own(tmp_path):
    model = tmp_path / "models" / "s.png.pt"
    a, b = TrainingClaim(model, lease_s=0.8), TrainingClaim(model, lease_s=0.8)
    assert a.take() and not b.take()
    assert b.holder() == f"{socket.gethostname()}:{os.getpid()}"
    time.sleep(1.2)
    assert not b.take()  # a's heartbeat (every lease/4) keeps it fresh past the lease
    a._stop.set()
    a._beat.join()  # a hangs (its heartbeat stops), as a host lost would
    time.sleep(1.0)
    assert a.stale() and b.take()
    a.release()  # a's late release leaves b's claim alone
    assert a.path.read_text() == b.me
    b.release()
    assert not a.path.exists() and list(model.parent.iterdir()) == []


def test_a_claim_of_a_dead_process_of_this_host_is_taken_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    model = tmp_path / "s.png.pt"
    claim = TrainingClaim(model, lease_s=600)
    claim.path.write_text(f"{socket.gethostname()}:{dead.pid} 0a1b2c3d")  # fresh mtime, owner gone
    assert claim.take()
    claim.release()
    other_host = TrainingClaim(model, lease_s=600)
    other_host.path.write_text("elsewhere:1 0a1b2c3d")  # another host's, fresh: not ours to judge by pid
    assert not claim.take()
