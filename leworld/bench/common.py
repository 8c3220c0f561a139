"""What the benchmarks share: the machine's name, waiting for the accelerator, peak memory, and
random frames laid out as real ones."""

import ctypes
import platform
import re
import sys
from pathlib import Path

import torch
from einops import rearrange


class PeakMemory:
    """Peak memory (MiB) allocated inside the block, above what was in use when it started.

    CUDA: the caching allocator's peak. CPU (Linux, glibc): the process's peak resident set
    (VmHWM), reset on entry through /proc/self/clear_refs. glibc keeps freed blocks in its heap and
    hands them out again without the resident set growing, so on entry its free pages are given
    back to the system (malloc_trim) and every new block of 64 KiB or more is made its own
    mapping. That slows allocation for the rest of the process: time things before measuring memory.
    """

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            libc, M_MMAP_THRESHOLD = ctypes.CDLL("libc.so.6"), -3
            libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
            libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.start = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = self._status("VmHWM")
        self.mib = (peak - self.start) / 2**20


def random_frames(shape: tuple[int, int], size: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 frames (B, T, 3, H, W) laid out as leworld's datasets and envs hand them over: a view
    of (B, T, H, W, 3) memory, channels-last. Contiguous (B, T, 3, H, W) frames would time slower
    convolutions than training and planning ever run (1.3x at the CPU preset)."""
    hwc = torch.randint(0, 256, (*shape, size, size, 3), dtype=torch.uint8, generator=generator)
    return rearrange(hwc, "b t h w c -> b t c h w")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpuinfo = Path("/proc/cpuinfo")
    found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else None
    cpu = found.group(1) if found else platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def print_header(what: str, machine: str, benchmark: str) -> None:
    """The lines above each benchmark's table: what it times, on what machine, and its command."""
    print(what)
    print(f"machine: {machine}")
    print(f"command: python -m leworld.bench {benchmark} {' '.join(sys.argv[2:])}".rstrip() + "\n")
