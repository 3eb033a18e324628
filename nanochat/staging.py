"""
Host-to-device batch staging: asynchronous copies that never overwrite a host buffer a copy may still be reading.

    staging = HostStaging([((B, T), torch.long), ((B, T), torch.long)], device)
    inputs, targets = staging.put(lambda x, y: (x.copy_(rows[:, :-1]), y.copy_(rows[:, 1:])))

Protocol (the pretraining loader, the Ray Data pipeline and SFT all follow it through this class):
  1. the producer builds a batch on the host in its own memory (numpy rows, Python lists), overlapping the device;
  2. `put(fill)` takes the next of `slots` host buffers (pinned on CUDA), first WAITING until the copy that last
     read that buffer has completed (the completion handle recorded after it), lets `fill(*buffers)` write the
     batch into it, starts the copies into fresh device tensors and records a completion handle after them;
  3. the caller gets those device tensors: each batch has its own, so a later batch never overwrites an earlier
     one (the caching allocator recycles their memory in stream order once the caller drops them).
Why: a CUDA copy from pinned memory with non_blocking=True returns before the GPU runs it. When the GPU lags the
CPU (gradient accumulation, evaluation loops: nothing synchronises between micro-steps), a buffer refilled before
its copy ran hands the GPU a later batch's data (duplicated, skipped or torn batches). With a ring of `slots`
buffers the CPU waits only when it runs `slots` copies ahead of the GPU, so the copy stays asynchronous.

The copy is injectable (`transfer(host_tensors, device) -> (device_tensors, done)`, where `done.synchronize()`
blocks until the copy has read its sources), so the protocol can be tested on CPU with a device that lags.
On CPU no copy happens: `fill` writes straight into fresh tensors that are returned. Other devices (MPS) copy
synchronously from pageable memory.
"""

import torch


def cuda_transfer(host: tuple, device: torch.device):
    """Start non-blocking copies of pinned host tensors into fresh tensors on `device` (its current stream)."""
    out = tuple(h.to(device, non_blocking=True) for h in host)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    return out, done


class HostStaging:
    """A ring of `slots` host buffers (one tensor per spec) feeding asynchronous copies to `device`."""

    def __init__(self, specs, device, slots: int = 4, transfer=None):
        """specs: [(shape, dtype), ...], one tensor each per batch. transfer: see the module docstring (tests)."""
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.specs = [(tuple(shape), dtype) for shape, dtype in specs]
        self.device = torch.device(device)
        if transfer is None and self.device.type == "cuda":
            transfer = cuda_transfer
        self.transfer = transfer
        self.pin = transfer is cuda_transfer
        self._slots, self._done, self._next = [], [], 0
        if transfer is not None:
            for _ in range(slots):
                self._slots.append(tuple(torch.empty(s, dtype=d, pin_memory=self.pin) for s, d in self.specs))
                self._done.append(None)

    def _fresh(self):
        return tuple(torch.empty(s, dtype=d) for s, d in self.specs)

    def put(self, fill) -> tuple:
        """fill(*host_tensors) writes one batch; returns its device tensors (a copy may still be in flight)."""
        if self.transfer is None:  # CPU: no staging needed; other devices: a synchronous copy
            host = self._fresh()
            fill(*host)
            return host if self.device.type == "cpu" else tuple(h.to(self.device) for h in host)
        i = self._next
        self._next = (i + 1) % len(self._slots)
        if self._done[i] is not None:
            self._done[i].synchronize()  # the copy that last read this buffer has completed: safe to overwrite
        host = self._slots[i]
        fill(*host)
        out, self._done[i] = self.transfer(host, self.device)
        return out

    def put_copies(self, *sources) -> tuple:
        """put() of a batch given as host tensors, one per spec (converted to the spec's dtype)."""

        def fill(*host):
            for h, src in zip(host, sources, strict=True):
                h.copy_(src)

        return self.put(fill)
