"""Data-parallel calibration over torch.distributed ranks, launched by torchrun:

    torchrun --standalone --nproc-per-node N -m quantize.cli run RECIPE      (gloo on CPU, NCCL on CUDA)

Rank 0 runs the whole pipeline as a single process would. For each GPTQ variant it hands the other ranks the
job (the method, the base model, the calibration tokens); every rank then streams the model layer by layer on its
own contiguous share of the calibration samples (whole forward batches), so the layer forwards are split N ways:

    Σ XᵀX = Σ_r Σ XᵣᵀXᵣ            each linear group's Hessian sum, all-reduced in float64 (statistics.Hessian):
                                   the single process's sum, since each rank takes whole forward batches and
                                   float32 Gram matrices add exactly in float64
    the solve on rank 0            each group's GPTQ solve runs once, on rank 0, and its codes and grids are
                                   broadcast, so all ranks carry the same quantized layer into their next forward
    rank 0 writes the artefact      the other ranks run the layers and write nothing

AWQ the same way: x̄, the Gram matrices, the block and clip errors and their counts are sums over the tokens in
float64 (in one process too), summed over the ranks, so each α and clip is judged on every rank's tokens and every
rank folds the same scales; the evenly spaced sequences and tokens AWQ samples are counted over all ranks. Tested
byte for byte against one process (also with search_samples, whose judged sequences a rank forwards in other
batches than one process would: where a BLAS product's last bits depend on its batch, a choice tied to the last
bit could flip).

The ranks talk over a process group of their own (gloo for CPU tensors, NCCL for CUDA ones, on torchrun's store),
never torch.distributed's default group: libraries that find a default group initialised act on it (transformers'
compressed-tensors loading joined collectives of its own on rank 0 when we used one). The other ranks wait for jobs
between variants (`serve`); rank 0 sends None when its run ends. Methods without a
distributed path (RTN, INT8, GGUF, auto) run on rank 0 alone. Not supported across ranks: sparse MoE models
(each expert's fallback to all tokens is decided from routed counts, which differ per rank) and continuing an
interrupted build (each rank's activations would need saving; a build across ranks starts its layers over).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from quantize.common.errors import QuantizeError
from quantize.methods.checkpoint import Checkpoint
from quantize.methods.engine import BATCH

DISTRIBUTED = ("gptq", "awq")  # methods whose calibration is split across ranks


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def many(self) -> bool:
        return self.world > 1

    def parts(self, samples: int) -> list[range]:
        """Each rank's samples: whole forward batches (engine.BATCH sequences), contiguous, shared out as evenly as
        they go. A sequence then meets the same batch mates as in one process, so every activation, Hessian and
        code is the single process's."""
        batches = list(range(0, samples, BATCH))
        if len(batches) < self.world:
            raise QuantizeError(f"calibration: {samples} samples make {len(batches)} forward batches of {BATCH} "
                                f"sequences, fewer than the {self.world} ranks; give each rank at least one batch "
                                f"(`calibration.samples` ≥ {BATCH * self.world}) or run fewer processes")
        shares = [list(b) for b in torch.tensor(batches).tensor_split(self.world)]
        return [range(int(s[0]), min(int(s[-1]) + BATCH, samples)) for s in shares]

    def local(self, calib: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's share of the calibration samples [samples, seq_len]."""
        if calib is None or not self.many:
            return calib
        mine = self.parts(calib.shape[0])[self.rank]
        return calib[mine.start : mine.stop]

    def describe(self, calib: torch.Tensor | None) -> dict:
        sizes = [] if calib is None else [len(p) for p in self.parts(calib.shape[0])]
        return {"world": self.world, "backend": "nccl" if "cuda" in _groups else "gloo", "samples_per_rank": sizes,
                "split": f"whole forward batches of {BATCH} calibration samples per rank; Σ XᵀX all-reduced "
                         "(float64); each solve on rank 0, broadcast"}

    def all_reduce_hessian(self, hess) -> None:
        """hess (Σ XᵀX over this rank's n tokens, float64) becomes the sum over every rank's tokens: the single
        process's sum, bit for bit in practice (statistics.Hessian)."""
        if not self.many:
            return
        n = torch.tensor([hess.n], dtype=torch.int64, device=hess.xtx.device)
        _all_reduce(hess.xtx)
        _all_reduce(n)
        hess.n = int(n.item())

    def shared_solve(self, solve, device):
        """solve() on rank 0, its result (a dataclass of tensors) sent to every rank, on `device`. Not split by
        rows: a BLAS product's summation order can depend on how many rows it has (GPTQ's block update), which
        would make the codes differ from the single process's in the last bits and then, through the error
        feedback, in the codes themselves."""
        if not self.many:
            return solve()
        result = None
        if self.rank == 0:
            result = solve()
            result = dataclasses.replace(result, **{f.name: getattr(result, f.name).cpu()
                                                    for f in dataclasses.fields(result)
                                                    if isinstance(getattr(result, f.name), torch.Tensor)})
        result = _broadcast_object(result)
        return dataclasses.replace(result, **{f.name: getattr(result, f.name).to(device)
                                              for f in dataclasses.fields(result)
                                              if isinstance(getattr(result, f.name), torch.Tensor)})

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the ranks (in float64 on the way; the same tensor in one process)."""
        if not self.many:
            return t
        total = t.double().clone()
        _all_reduce(total)
        return total.to(t.dtype)

    def mean(self, local_sum: torch.Tensor, local_count: int) -> torch.Tensor:
        """Σ / n over every rank's terms, from this rank's float sum and count."""
        count = self.sum(torch.tensor(float(local_count), dtype=torch.float64, device=local_sum.device))
        return (self.sum(local_sum.double()) / count).float()

    def offsets(self, count: int) -> tuple[int, int]:
        """(where this rank's `count` items start among every rank's, how many there are in all), in rank order."""
        if not self.many:
            return 0, count
        counts = torch.zeros(self.world, dtype=torch.float64)
        counts[self.rank] = count
        counts = self.sum(counts).long().tolist()
        return sum(counts[: self.rank]), sum(counts)

    def device(self, device: str) -> str:
        """Under torchrun each rank takes its own GPU: `cuda` (auto's cuda too) is cuda:LOCAL_RANK."""
        if self.many and device == "cuda":
            return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        return device


_groups: dict[str, object] = {}  # "store", "cpu" (gloo), "cuda" (NCCL, made on first use)
_TIMEOUT = timedelta(days=1)  # the other ranks wait for jobs while rank 0 evaluates


def current() -> Ranks:
    if "cpu" in _groups:
        return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    return Ranks()


def _group(t: torch.Tensor):
    if t.device.type == "cuda" and "cuda" not in _groups:
        ranks = current()
        _groups["cuda"] = dist.ProcessGroupNCCL(dist.PrefixStore("nccl/", _groups["store"]), ranks.rank, ranks.world)
    return _groups["cuda" if t.device.type == "cuda" else "cpu"]


def _all_reduce(t: torch.Tensor) -> None:
    _group(t).allreduce([t]).wait()


def _broadcast(t: torch.Tensor, src: int) -> None:
    _group(t).broadcast(t, src).wait()


def _broadcast_object(obj=None, src: int = 0):
    """obj from rank src (pickled) to every rank; the others pass None and get it."""
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8) if current().rank == src else None
    size = torch.tensor([0 if data is None else data.numel()], dtype=torch.int64)
    _broadcast(size, src)
    buffer = data if data is not None else torch.empty(int(size), dtype=torch.uint8)
    _broadcast(buffer, src)
    return obj if data is not None else pickle.loads(buffer.numpy().tobytes())


def for_method(method, sparse_moe: bool) -> Ranks:
    """The ranks a build of `method` spreads over: every rank for a method with a distributed path, else this
    process alone (rank 0 builds it; the others wait)."""
    ranks = current()
    if not (ranks.many and _spread) or method.name not in DISTRIBUTED:  # e.g. GGUF's AWQ scales, auto's GPTQ:
        return Ranks()  # builds nested in a method rank 0 runs alone stay on rank 0
    if sparse_moe:
        raise QuantizeError(f"method {method.name}: calibration across torch.distributed ranks does not take sparse "
                            "MoE models yet (each expert's fallback is decided from routed counts, which differ "
                            "per rank); run it as one process")
    return ranks


def resume_point(out_dir: Path, ranks: Ranks):
    """The engine's Checkpoint of a build in `out_dir` (it continues after the last finished layer of an
    interrupted build), or None across ranks, where a build starts over and leaves no stale state behind."""
    if ranks.many:
        (out_dir / Checkpoint.FILE).unlink(missing_ok=True)
        return None
    return Checkpoint(out_dir)


def init_from_env() -> Ranks:
    """Join the ranks torchrun describes (WORLD_SIZE > 1 in the environment); a plain run is rank 0 of 1. The store
    is torchrun's (its agent hosts it: TORCHELASTIC_USE_AGENT_STORE), or rank 0's under another launcher that sets
    MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "cpu" in _groups:
        return current()
    rank = int(os.environ["RANK"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent, timeout=_TIMEOUT)
    _groups["store"] = dist.PrefixStore("quantize/", store)
    _groups["cpu"] = dist.ProcessGroupGloo(dist.PrefixStore("gloo/", _groups["store"]), rank, world, _TIMEOUT)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return current()


_spread_build_failed = False  # rank 0 left a build the other ranks are still in: they cannot take a message
_spread = False  # inside a build spread over every rank (rank 0's `build`, the others' `serve`)


def build(module, method, base, out_dir: Path, calib, calib_info):
    """module.build(...) — on rank 0 of several, first handing the job to the other ranks when the method
    splits its calibration across them."""
    global _spread_build_failed, _spread
    if not (current().many and method.name in DISTRIBUTED):
        return module.build(method, base, out_dir, calib, calib_info)
    _broadcast_object((module.__name__, method, base, calib))
    _spread_build_failed = _spread = True
    try:
        info = module.build(method, base, out_dir, calib, calib_info)
    finally:
        _spread = False
    _spread_build_failed = False
    return info


def worker_loop() -> None:
    """A rank other than 0: take rank 0's jobs until it sends None, each built on this rank's share."""
    import importlib

    global _spread
    while True:
        job = _broadcast_object()
        if job is None:
            return _close()
        name, method, base, calib = job
        with tempfile.TemporaryDirectory(prefix=f"quantize-rank{current().rank}-") as tmp:
            _spread = True
            try:
                importlib.import_module(name).build(method, base, Path(tmp), calib, None)
            except QuantizeError:  # rank 0 meets the same error and reports it; torchrun ends the ranks
                raise SystemExit(2) from None
            finally:
                _spread = False


def stop() -> None:
    """Rank 0, at the end of its run (finished or failed): release the other ranks. After a build that failed
    on this rank the others are inside it; this rank's non-zero exit makes torchrun end them."""
    if current().many and not _spread_build_failed:
        _broadcast_object(None)
        _close()


def _close() -> None:
    """Every rank, at the end: wait for the others, then drop the groups (a group left to the interpreter's exit
    aborts the process)."""
    _groups["cpu"].barrier().wait()
    _groups.clear()
