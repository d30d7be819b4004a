"""Process memory on Linux, for the benchmarks that measure peak memory per case.

``reset_peak`` clears the kernel's resident-memory high-water mark (``VmHWM``) through
``/proc/self/clear_refs``; ``status_kib("VmHWM:")`` then reads the peak since the reset,
``status_kib("VmRSS:")`` the current resident size.
"""

from __future__ import annotations


def status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current resident size; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def available_mib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 1024
