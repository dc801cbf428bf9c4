"""``reconstruct``: post-training block reconstruction (Protocol B family: BRECQ, Genie, DGH) on any set.

Block by block, input to output, the student's block is trained so that its output matches the
full-precision block's on the calibration images. The FP reference is the student's own graph
with fake quantization switched off (so no mapping between the teacher's modules and the
toolchain's graph is needed, and BN folding matches exactly). What trains:

- weights through the fake-quant's straight-through estimator, at a small LR: in a few hundred
  steps this moves only the weights near a rounding boundary, i.e. it learns the rounding
  (this is not AdaRound's rectified-sigmoid rounding; see docs/lowbit.md);
- the weight and activation step sizes, LSQ, through the toolchains' learnable fake-quants;
- QDrop (``qdrop`` > 0): each element of a block's input is the FP value with that probability,
  the quantized one otherwise, so a block does not overfit to its predecessors' errors.

A block's input is the already-reconstructed student's output of the block before. Blocks are
found from the graph (``dfq_plugins.quant.blocks``), so FX and PT2E students both work; NNCF's
eager model has no graph to cut and is refused with a clear error. A checkpoint is written after
every block; an interrupted run resumes at the next block.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import distributed
from ..config import POSITIVE, UNIT, Bound
from ..data import CalibrationSet
from ..progress import progress_bar
from ..quant.blocks import Block, BlockRunner, block_parameters, find_blocks
from ..quant.learnable import clamp_scales, learned_range_parameters
from ..quant.snap import snap_weights_to_grid
from ..teacher import Teacher
from .base import Distiller
from .checkpoint import load_checkpoint, save_checkpoint


@dataclass
class RunSummary:
    """What the bench harness reads of a finished run (as from the step loop's TrainingRun)."""

    step: int = 0
    elapsed: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def _run_all(runner: BlockRunner, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([runner(x[i:i + batch]) for i in range(0, x.shape[0], batch)])


def _fp_shadow(student: nn.Module) -> nn.Module:
    """A copy of the student that computes in float: every fake-quant off, every observer off."""
    import copy

    with warnings.catch_warnings():  # a strict export's pytree specs warn about their own deprecations
        warnings.simplefilter("ignore", FutureWarning)
        shadow = copy.deepcopy(student)
    for m in shadow.modules():
        if hasattr(m, "disable_fake_quant") and hasattr(m, "fake_quant_enabled"):
            m.disable_fake_quant()
    for p in shadow.parameters():
        p.requires_grad_(False)
    return shadow


@dataclass
class ReconstructDistiller(Distiller):
    """``steps`` are optimisation steps per block (BRECQ: 20,000; the CPU default: 200)."""

    name: ClassVar[str] = "reconstruct"

    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-4  # weights (straight-through, Adam); small, so mostly near-boundary roundings flip
    range_lr: float = 1e-3  # step sizes: Adam at this fraction of each quantizer's own mean scale
    weight_decay: float = 0.0
    qdrop: float = 0.5
    ranges: str = "learned"
    loss: str = "mse"
    extra_bounds: ClassVar[dict[str, Bound]] = {"range_lr": POSITIVE, "qdrop": UNIT}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.qdrop <= 1.0:
            raise ValueError(f"qdrop={self.qdrop}: a probability, between 0 and 1")
        if self.ranges != "learned":
            raise ValueError("reconstruct learns the step sizes (ranges='learned'); it has no observer mode")
        if self.loss not in ("mse",):
            raise ValueError(f"loss={self.loss!r}; only 'mse' (block output error) is offered")

    def distill(self, teacher: Teacher, student: nn.Module, source: CalibrationSet | None, *, toolchain: Any,
                seed: int = 0, progress: bool = True, workdir: Path | None = None, key: str = "") -> nn.Module:
        if source is None:
            raise ValueError("reconstruct needs calibration images: pass source=CalibrationSet "
                             "(e.g. dfq_plugins.synthesize(model, 'genie'))")
        if not isinstance(student, fx.GraphModule):
            raise TypeError(f"reconstruct cuts the student's graph into blocks, and {toolchain.name}'s student "
                             "is not a graph (NNCF quantizes an eager model); use torch-ao-fx or torchao-pt2e, "
                             "or distiller kd on nncf")
        toolchain.student_eval(student)
        toolchain.make_ranges_learnable(student)
        blocks = find_blocks(student)
        ranges = {id(p) for p in learned_range_parameters(student)}
        from ..device import module_device

        images = source.images.float().to(module_device(student))  # block inputs/outputs live where the student is
        path = None if workdir is None else Path(workdir) / "checkpoint.safetensors"
        done, elapsed = 0, 0.0
        shadow = _fp_shadow(student)  # before a checkpoint is loaded: the reference keeps the FP weights
        fp_blocks = find_blocks(shadow)
        if path is not None and path.exists():
            header = load_checkpoint(path, key=key or self.name, modules={"student": student}, optimizers={})
            done, elapsed = int(header["step"]), float(header["elapsed"])
        started = time.perf_counter() - elapsed
        history: list[dict[str, float]] = []
        with torch.no_grad():
            q_in, fp_in = images, images
            for b in range(done):  # inputs of the first block still to do
                q_in = _run_all(BlockRunner(student, blocks[b]), q_in, 256)
                fp_in = _run_all(BlockRunner(shadow, fp_blocks[b]), fp_in, 256)
        bar = progress_bar(total=len(blocks) * self.steps, desc="reconstruct", enabled=progress,
                           initial=done * self.steps)
        try:
            for b in range(done, len(blocks)):
                fp_out = _run_all(BlockRunner(shadow, fp_blocks[b]), fp_in, 256)
                g = torch.Generator().manual_seed(seed * 1_000_003 + b)  # per block: a resumed run draws the same
                before, after = self._reconstruct_block(student, blocks[b], ranges, q_in, fp_in, fp_out, g, bar)
                history.append({"block": b, "mse_before": before, "mse_after": after})
                with torch.no_grad():
                    q_in = _run_all(BlockRunner(student, blocks[b]), q_in, 256)
                fp_in = fp_out
                done = b + 1
                if path is not None and distributed.current().is_main:  # ranks run it replicated; one writes
                    try:
                        save_checkpoint(path, key=key or self.name, step=done, elapsed=time.perf_counter() - started,
                                        modules={"student": student}, optimizers={}, extra={"history": history})
                    except OSError as exc:  # a failing disk costs the resume point, never the run
                        warnings.warn(f"reconstruct: could not write the checkpoint after block {done} to {path} "
                                      f"({type(exc).__name__}: {exc}); going on without it", stacklevel=2)
        finally:
            bar.close()
        snap_weights_to_grid(student, images[:2], toolchain)
        toolchain.student_eval(student)
        self.last_run = RunSummary(step=done * self.steps, elapsed=time.perf_counter() - started,
                                   extra={"blocks": len(blocks), "block_mse": history})
        return student

    def _reconstruct_block(self, student: fx.GraphModule, block: Block, ranges: set[int], q_in: torch.Tensor,
                           fp_in: torch.Tensor, fp_out: torch.Tensor, g: torch.Generator,
                           bar: Any) -> tuple[float, float]:
        runner = BlockRunner(student, block)
        params = [p for p in block_parameters(student, block) if p.is_floating_point()]
        steps_of = [p for p in params if id(p) in ranges]
        weights = [p for p in params if id(p) not in ranges]
        for p in params:
            p.requires_grad_(True)
        groups = [{"params": weights, "lr": self.lr}]
        for p in steps_of:  # Adam's step ignores the gradient's size: make it relative to the scale's
            groups.append({"params": [p], "lr": self.range_lr * max(float(p.detach().abs().mean()), 1e-8)})
        opt = torch.optim.Adam(groups, weight_decay=self.weight_decay)
        with torch.no_grad():
            before = float(F.mse_loss(_run_all(runner, q_in, 256), fp_out))
        n = q_in.shape[0]
        for step in range(self.steps):
            idx = torch.randint(0, n, (min(self.batch_size, n),), generator=g)
            x = q_in[idx]
            if self.qdrop > 0:
                keep_fp = (torch.rand(x.shape, generator=g) < self.qdrop).to(x.device)
                x = torch.where(keep_fp, fp_in[idx], x)
            loss = F.mse_loss(runner(x), fp_out[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            clamp_scales(student)
            if step % 20 == 0:
                bar.set_postfix({"block": block.index, "mse": f"{loss.item():.3g}"}, refresh=False)
            bar.update(1)
        with torch.no_grad():
            after = float(F.mse_loss(_run_all(runner, q_in, 256), fp_out))
        return before, after


__all__ = ["ReconstructDistiller"]
