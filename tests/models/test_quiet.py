"""Third-party noise that trainloop causes is dropped where it causes it, and nothing else is."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from trainloop.models import quiet


@pytest.mark.slow  # starts a process
@pytest.mark.skipif(torch.cuda.is_available(), reason="torchao's CUDA kernels load on a CUDA machine")
def test_fp8_on_a_machine_without_cuda_imports_torchao_without_its_noise():
    code = ("import torch, trainloop as tl\n"
            "state, model = tl.prepare(tl.init(precision='fp8'), torch.nn.Linear(16, 16))\n"
            "print('converted', type(tl.unwrap(model)).__name__)\n")
    shown = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                           timeout=300)
    assert shown.returncode == 0 and "converted Float8Linear" in shown.stdout, shown.stdout + shown.stderr
    assert "Failed to load" not in shown.stderr and "Enum subclass" not in shown.stderr, shown.stderr


def test_only_the_named_messages_are_dropped_and_only_during_the_import(caplog, monkeypatch):
    monkeypatch.delitem(sys.modules, "torchao", raising=False)  # as if not imported yet
    torchao_logger, pytree_logger = logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")
    with caplog.at_level(logging.WARNING), quiet.torchao_import(cuda_available=False):
        torchao_logger.warning("Failed to load /x/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: no")
        torchao_logger.warning("Skipping import of cpp extensions due to incompatible torch version")
        pytree_logger.warning("%s is an Enum subclass and is now natively supported by torch.compile", "E")
        pytree_logger.warning("some other pytree message")
    with caplog.at_level(logging.WARNING), quiet.torchao_import(cuda_available=True):
        torchao_logger.warning("Failed to load /x/torchao/_C_cutlass_90a.abi3.so: no")
    torchao_logger.warning("Failed to load /x/torchao/_C_mxfp8.so: after the import")
    assert [r.getMessage() for r in caplog.records] == [
        "Skipping import of cpp extensions due to incompatible torch version",
        "some other pytree message",
        "Failed to load /x/torchao/_C_cutlass_90a.abi3.so: no",  # with CUDA, a kernel that fails matters
        "Failed to load /x/torchao/_C_mxfp8.so: after the import",
    ]
    assert not torchao_logger.filters and not pytree_logger.filters
