"""`nst-batch run --ray` on a Ray cluster of several nodes (ray.cluster_utils.Cluster: real raylets, one
machine): a node that leaves mid-run costs nothing but the pair it was computing, which another node
makes. Its own file: the pytest process must not be connected to test_ray.py's cluster meanwhile.
"""

from __future__ import annotations

import pytest

from test_ray import FAST, count_done, each_done_once, ledger_rows, popen, temporaries, wait_for

pytestmark = pytest.mark.slow  # end to end through the CLI in subprocesses: `-m "not slow"` skips them


def test_a_node_removed_mid_run_loses_no_pair_and_makes_none_twice(folders):
    cluster_utils = pytest.importorskip("ray.cluster_utils")
    store = 80 * 2**20
    # The head runs no actor (0 CPUs); each worker node has room for one actor.
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, object_store_memory=store, include_dashboard=False))
    try:
        nodes = [cluster.add_node(num_cpus=1, object_store_memory=store) for _ in range(2)]
        cluster.wait_for_nodes()
        content, styles, out = folders
        count_done(out)
        proc = popen(["run", "--content", str(content), "--styles", str(styles), "--out", str(out), *FAST,
                      "--steps", "20", "--ray", cluster.address, "--ray-workers", "2"])
        try:
            wait_for(lambda: sum(s == "done" for s, _ in ledger_rows(out).values()) >= 1
                     and sum(s == "running" for s, _ in ledger_rows(out).values()) >= 2, 180,
                     "a pair done and two claimed", proc)
            cluster.remove_node(nodes[1])
            text, _ = proc.communicate(timeout=240)
        finally:
            proc.kill()
        assert proc.returncode == 0, text
        each_done_once(out)
        assert not temporaries(out)
    finally:
        cluster.shutdown()
