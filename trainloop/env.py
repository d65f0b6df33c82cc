"""`python -m trainloop env`: the facts a bug report needs, in one paste.

Versions (Python, torch, trainloop, the optional libraries trainloop works with), the devices
torch sees, the distributed backends this torch build has, and the environment variables that
change how a run starts (trainloop's settings, the launcher's topology, device visibility,
threads, NCCL/Gloo). Only those variables: nothing else from the environment (tokens, keys) is
ever printed. Optional libraries are looked up by their installed metadata, not imported, so the
report takes about as long as `import torch`.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

# Every core dependency (setup.cfg's install_requires besides torch, which is reported above
# them), then the libraries trainloop uses when they are installed (the extras) and the
# alternatives a report may need to mention.
CORE_LIBRARIES = ("attrs", "tqdm", "safetensors", "xxhash", "blake3") + (("tomli",) if sys.version_info < (3, 11) else ())
OPTIONAL_LIBRARIES = ("numpy", "tensorboard", "wandb", "mlflow", "torchao", "transformers", "accelerate")

# Variables shown by exact name, then by prefix.
VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
             "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
             "ROCR_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GLOO_SOCKET_IFNAME",
             "PYTORCH_CUDA_ALLOC_CONF", "TORCH_DISTRIBUTED_DEBUG", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE",
             "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID",
             "SLURM_NTASKS", "SLURM_NODEID", "SLURM_JOB_NUM_NODES")
VARIABLE_PREFIXES = ("TRAINLOOP_", "TORCHELASTIC_", "NCCL_", "TORCH_NCCL_")

BACKENDS = ("gloo", "nccl", "mpi", "ucc", "xccl")


def collect() -> dict[str, Any]:
    """The report as plain values: {"versions", "devices", "backends", "environment"}."""
    import torch
    import torch.distributed as dist

    from trainloop import __version__

    versions: dict[str, Any] = {
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch cuda": torch.version.cuda,
        "torch hip": torch.version.hip,
        "trainloop": __version__,
    }
    for name in CORE_LIBRARIES + OPTIONAL_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "versions": versions,
        "devices": _devices(torch),
        "backends": {name: _backend_available(dist, name) for name in BACKENDS},
        "environment": {name: value for name, value in sorted(os.environ.items())
                        if name in VARIABLES or name.startswith(VARIABLE_PREFIXES)},
    }


def _devices(torch: Any) -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    found: dict[str, Any] = {"cpu cores": f"{usable} usable of {os.cpu_count()}",
                             "torch threads": torch.get_num_threads(), "accelerator": None}
    if not torch.accelerator.is_available():
        return found
    kind = torch.accelerator.current_accelerator().type
    found["accelerator"] = kind
    count = torch.accelerator.device_count()
    backend = getattr(torch, kind, None)
    names = [backend.get_device_name(i) if hasattr(backend, "get_device_name") else kind
             for i in range(count)]
    found["count"] = count
    found["names"] = names
    if kind == "cuda":
        found["cudnn"] = torch.backends.cudnn.version()
        found["bf16 supported"] = torch.cuda.is_bf16_supported()
        if torch.distributed.is_available() and torch.distributed.is_nccl_available():
            version = torch.cuda.nccl.version()  # a tuple; an int in older torch
            found["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return found


def _backend_available(dist: Any, name: str) -> bool:
    if not dist.is_available():
        return False
    check = getattr(dist, f"is_{name}_available", None)
    return bool(check and check())


def format_report(report: dict[str, Any]) -> str:
    """The report as text, one fact per line, to paste into an issue."""
    lines = ["trainloop environment (paste this into a bug report)", "", "versions"]
    for name, value in report["versions"].items():
        lines.append(f"  {name} {value if value is not None else '-'}")
    lines += ["", "devices"]
    for name, value in report["devices"].items():
        shown = ", ".join(value) if isinstance(value, list) else ("none (CPU only)" if value is None else value)
        lines.append(f"  {name}: {shown}")
    lines += ["", "distributed backends"]
    lines += [f"  {name}: {'yes' if ok else 'no'}" for name, ok in report["backends"].items()]
    lines += ["", "environment"]
    lines += [f"  {name}={value}" for name, value in report["environment"].items()] or ["  (none of the variables that matter are set)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m trainloop env", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    options = parser.parse_args(argv)
    report = collect()
    try:
        print(json.dumps(report, indent=2) if options.json else format_report(report), flush=True)
    except BrokenPipeError:  # `python -m trainloop env | head`: the reader has what it wanted
        sys.stdout = None  # nothing more to flush at exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
