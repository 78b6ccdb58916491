"""Peak resident memory of this process over a stretch of code, on Linux.

The kernel's high-water mark (VmHWM) starts at process start, so it already holds whatever
setup touched (the temporaries of building the inputs, say) and would hide every later peak below
that. Writing "5" to /proc/self/clear_refs resets it to the current resident size (Linux >= 4.0),
so `reset()` just before the code and `peak_over_baseline()` after it give the memory the code
itself needed on top of what was resident when it started.
"""
from __future__ import annotations


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024     # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakRSS:
    def reset(self) -> float:
        """Restart the high-water mark at the current resident size; returns that size (MiB)."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError as e:
            raise RuntimeError(f"cannot reset the peak RSS through /proc/self/clear_refs ({e}): "
                               "this measurement needs Linux") from e
        self.baseline = _status_mib("VmRSS")
        if _status_mib("VmHWM") > self.baseline + 1:   # the reset did not take
            raise RuntimeError("writing 5 to /proc/self/clear_refs did not reset VmHWM")
        return self.baseline

    def peak_over_baseline(self) -> float:
        """Peak resident size since reset(), minus the size at reset() (MiB)."""
        return _status_mib("VmHWM") - self.baseline
