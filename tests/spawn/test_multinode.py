"""Many machines, for real: two `spawn` launchers on loopback play two machines of one job.

Each "machine" is a launcher process with one worker, as on a cluster (`--nnodes 2 --master
HOST:PORT`, with or without `--node-rank`). The job must train exactly like one process with the
big batch, and a machine that dies (its launcher SIGKILLed: the OOM killer, a node failure) must
end the other one within seconds, with a message that says what happened.
"""

from __future__ import annotations

import time

import psutil
import pytest
import torch

from tests.support.launching import SCRIPTS, alive, assert_reference, launch, wait_for_pids
from trainloop import spawn

pytestmark = pytest.mark.multiprocess


def _serves(job, port: int) -> bool:
    """Whether the launcher `job` listens on `port` (serves the rendezvous store)."""
    return any(c.laddr.port == port and c.status == psutil.CONN_LISTEN
               for c in psutil.Process(job.pid).net_connections(kind="tcp"))


@pytest.mark.parametrize(("ranks", "killed", "extra", "survivor_says"), [
    # Fixed node ranks (static rendezvous): machine 0, which serves the store, dies.
    ("node-rank", 0, [], "failed first on this machine"),
    # Ranks assigned on arrival (c10d rendezvous), with a restart allowed: the machine that does
    # not serve the store dies, and the survivor's restart waits --join-timeout for it, no longer.
    ("arrival", "not the store's", ["--max-restarts", "1", "--join-timeout", "10"], "did not all meet"),
])
def test_two_machines_train_like_one_process_and_a_dead_machine_ends_the_other(tmp_path, ranks, killed,
                                                                                extra, survivor_says):
    port = spawn.free_port()

    def machine(rank: int):
        fixed = ["--node-rank", str(rank)] if ranks == "node-rank" else []
        return launch("-n", "1", "--nnodes", "2", *fixed, "--master", f"127.0.0.1:{port}", *extra,
                      str(SCRIPTS / "train_tiny.py"), str(tmp_path / f"machine{rank}.pt"),
                      "--then-reduce", str(tmp_path))

    machines = [machine(0), machine(1)]
    pids = wait_for_pids(tmp_path, 2, machines)  # both trained, and now all-reduce forever
    [weights] = tmp_path.glob("machine*.pt")  # written by global rank 0 only
    saved = torch.load(weights, weights_only=True)
    assert saved["world_size"] == 2
    assert_reference(saved)

    if ranks == "arrival":  # the store is served by whichever launcher bound the port first
        [killed] = [i for i in (0, 1) if _serves(machines[i], port) == (killed == "the store's")]
    machines[killed].kill()
    # A generous bound, not a timing: a survivor that is not stopped waits for its collective's
    # timeout or for a rendezvous of 600 s, far beyond it.
    output, _ = machines[1 - killed].communicate(timeout=120)
    machines[killed].communicate(timeout=30)
    assert machines[1 - killed].returncode == 1, output
    assert "lost its connection to another rank" in output and survivor_says in output, output
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids), "a worker outlived its machine"


def test_a_rendezvous_failure_says_what_happened():
    from torch.distributed import DistNetworkError, DistStoreError
    from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousTimeoutError

    lost = spawn.rendezvous_failure(RendezvousConnectionError("The connection to the C10d store has failed."),
                                    2, "10.0.0.1:29500", 600)
    assert "connection to the rendezvous at 10.0.0.1:29500" in lost and "died or cannot be reached" in lost
    assert "(RendezvousConnectionError: The connection to the C10d store has failed.)" in lost
    assert "died or cannot be reached" in spawn.rendezvous_failure(DistNetworkError("timed out\nframe #0"), 2, "h:1", 5)
    for missing in (RendezvousTimeoutError(), DistStoreError("Timed out after 6 seconds waiting for clients. 1/2 clients joined.")):
        said = spawn.rendezvous_failure(missing, 2, "h:1", 5)
        assert "the 2 machines did not all meet at h:1 within --join-timeout 5 s" in said
        assert said.count("\n") == 0 and "docs/multinode.md" in said


def test_a_machine_whose_master_never_answers_says_so_in_one_line():
    """torch's store client logged each failed try with about forty lines of C++ frames."""
    port = spawn.free_port()
    job = launch("-n", "1", "--nnodes", "2", "--node-rank", "1", "--master", f"127.0.0.1:{port}",
                 "--join-timeout", "3", str(SCRIPTS / "show_argv.py"))
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 1 and output.count("\n") == 1, output
    assert "could not make, the connection to the rendezvous at 127.0.0.1" in output and "in 3 s" in output, output
