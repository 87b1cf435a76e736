"""Device leases: a GPU stage runs only while it holds one concrete device.

Prefect's tag concurrency limits count slots but pick no device, and have leaked slots when a
process was killed hard. A lease here is an exclusive `flock` on a file named for the physical
device: the kernel drops it when the holder's process dies, however it dies, so a lease can
never outlive its process, and every process on the machine (threads, Dask workers, separate
runs) sees the same leases.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from catalogen import stopping
from catalogen.storage.lease import printable
from catalogen.stage import Device  # the contract's type: what a stage is given

if TYPE_CHECKING:
    import torch



class DeviceError(RuntimeError):
    """The configured device is not on this machine."""


def _cuda_device(index: int) -> Device:
    import torch

    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    return Device(f"cuda:{index}", f"gpu-{uuid}" if uuid else f"gpu-{index}", props.name)


def visible_devices(requested: str = "auto") -> list[Device]:
    """The devices a run may lease: every visible GPU for "auto", else what was asked for."""
    import torch  # here, not at import: the CLI answers (and refuses) before torch has loaded

    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return [Device("cpu", "cpu")]
    if not torch.cuda.is_available():
        raise DeviceError(f"device {requested!r} requested but CUDA is not available")
    if requested in ("auto", "cuda"):
        return [_cuda_device(i) for i in range(torch.cuda.device_count())]
    index = int(requested.split(":", 1)[1])
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device {requested!r} requested but only {torch.cuda.device_count()} GPU(s) visible")
    return [_cuda_device(index)]


def default_dtype(device: Device, requested: str = "auto") -> "torch.dtype":
    """float32 on the CPU; float16 on CUDA, as Stable Diffusion is usually run (diffusers upcasts
    the SDXL VAE itself where float16 would overflow)."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    return torch.float32 if device.name == "cpu" else torch.float16


def lock_dir() -> Path:
    path = Path(os.environ.get("CATALOGEN_LOCK_DIR", Path(tempfile.gettempdir()) / "catalogen-leases"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _lock_file(device: Device) -> Path:
    return lock_dir() / f"{device.physical_id}.lock"


def _try_lock(device: Device) -> int | None:
    fd = os.open(_lock_file(device), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} thread {threading.get_ident()} since {time.strftime('%H:%M:%S')}\n".encode())
    return fd


def holder(device: Device) -> str:
    """Who holds a device's lease, as its holder wrote it (its first 200 bytes, printable: anyone on
    the machine can write into the lock folder)."""
    try:
        with _lock_file(device).open("rb") as fh:
            return printable(fh.read(200).decode(errors="replace").strip()) or "unknown"
    except OSError:
        return "unknown"


WaitReport = Callable[[str, str, float], None]  # (device, holder, seconds waited so far)


@contextmanager
def lease(
    devices: list[Device],
    poll_seconds: float = 0.05,
    timeout: float | None = None,
    on_wait: WaitReport | None = None,
    report_every: float = 30.0,
) -> Iterator[Device]:
    """Hold one of `devices` exclusively for the duration of the block.

    Each `flock` is on its own open file, so threads of one process exclude each other too.
    While every device is busy, `on_wait` hears who holds them every `report_every` seconds;
    past `timeout` the wait ends with a TimeoutError naming the holders.
    """
    if not devices:
        raise ValueError("no devices to lease")
    started = time.monotonic()
    next_report = started + report_every
    while True:
        for device in devices:
            fd = _try_lock(device)
            if fd is not None:
                try:
                    yield device
                finally:
                    os.close(fd)  # closing the file releases the lock
                return
        if stopping.STOPPING.is_set():  # a stopping run starts no new work
            raise stopping.Abandoned("the run is stopping; this shard did not start")
        now = time.monotonic()
        if timeout is not None and now - started > timeout:
            held = "; ".join(f"{d} held by {holder(d)}" for d in devices)
            raise TimeoutError(f"no device free after {timeout:g} s ({held})")
        if on_wait is not None and now >= next_report:
            for device in devices:
                on_wait(device.name, holder(device), now - started)
            next_report = now + report_every
        time.sleep(poll_seconds)
