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

It never returns a worse student than it was given, as far as held-back images can tell:
``holdout`` of the calibration images are not trained on. A block's update is kept only if its
output error on them falls, and rolled back otherwise. At the end, if the whole network's output
error on them is not lower than the calibrated student's, the calibrated student is returned.

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
from ..config import NON_NEGATIVE, POSITIVE, UNIT, UNIT_OPEN_ABOVE, Bound
from ..data import CalibrationSet
from ..progress import progress_bar
from ..quant.blocks import Block, BlockRunner, block_parameters, find_blocks
from ..quant.learnable import clamp_scales, clampable_scales, learned_range_parameters
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
    lr: float = 1e-4  # vectors (BN, biases), and weights when weight_lr is None (straight-through, Adam)
    weight_lr: float | None = 1e-3  # a weight tensor's Adam LR: this fraction of its own RMS (None: `lr` for all)
    range_lr: float = 1e-3  # step sizes: Adam at this fraction of each quantizer's own mean scale
    steps_by_size: bool = False  # a block's steps scale with the square root of its weight count
    weight_decay: float = 0.0
    qdrop: float = 0.5
    holdout: float = 0.125  # of the calibration images (32 of 256), held back to judge each update (0: no guard)
    ranges: str = "learned"
    loss: str = "mse"
    bias_correction: str = "bn"  # before training (see _correct_start): "bn", "on" (images as they are), "off"
    # refuse to fit images the FP model's BatchNorm statistics say are unlike its training data (mean
    # mismatch in running stds, synthesizers.bn_stats.bn_mismatch: real 0.10, zeroq 0.05, noise ~0.5);
    # 0 turns the check off
    bn_check: float = 0.3
    # every this many steps, the block's held-back error is measured; training stops (and the best state
    # seen is restored) once it is not 1% below the best so far. 0: every block runs all its steps
    early_stop: int = 0
    extra_bounds: ClassVar[dict[str, Bound]] = {"range_lr": POSITIVE, "weight_lr": POSITIVE, "qdrop": UNIT,
                                                 "holdout": UNIT_OPEN_ABOVE, "bn_check": NON_NEGATIVE,
                                                 "early_stop": NON_NEGATIVE}
    extra_choices: ClassVar[dict[str, tuple]] = {"bias_correction": ("bn", "on", "off")}
    later_options: ClassVar[dict[str, Any]] = {"early_stop": 0}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.qdrop <= 1.0:
            raise ValueError(f"qdrop={self.qdrop}: a probability, between 0 and 1")
        if self.ranges != "learned":
            raise ValueError("reconstruct learns the step sizes (ranges='learned'); it has no observer mode")
        if self.loss not in ("mse",):
            raise ValueError(f"loss={self.loss!r}; only 'mse' (block output error) is offered")
        if self.teacher_precision != "fp32":
            raise ValueError("reconstruct's targets come from the student's own graph with fake quantization off, "
                             "not from the teacher, so teacher_precision does not apply; leave it at 'fp32'")

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
        from ..device import module_device

        images = source.images.float().to(module_device(student))  # block inputs/outputs live where the student is
        mismatch, refused = self._unlike_training_data(teacher, images) if self.bn_check else (None, False)
        train, held = self._split(images.shape[0], seed)
        if refused:  # no block trains; the start is still bias-corrected, as post-training's -bcbn would be
            start = {"start_bias_corrected": 0}
            if self.bias_correction == "bn":  # "on" would fit the biases to the images refused; observers stay put
                with toolchain.measuring(student):
                    start = self._correct_start(teacher, student, _fp_shadow(student), toolchain, images, train, held)
            self.last_run = RunSummary(extra={**start, "returned": "calibrated", "bn_mismatch": mismatch,
                                              "refused": "bn_check"})
            return student
        toolchain.make_ranges_learnable(student)
        blocks = find_blocks(student)
        ranges = {id(p) for p in learned_range_parameters(student)}
        path = None if workdir is None else Path(workdir) / "checkpoint.safetensors"
        done, elapsed = 0, 0.0
        shadow = _fp_shadow(student)  # before a checkpoint is loaded: the reference keeps the FP weights
        fp_blocks = find_blocks(shadow)
        start = self._correct_start(teacher, student, shadow, toolchain, images, train, held)
        calibrated = None
        if held is not None:  # what the guard falls back to, and the error it must beat
            calibrated = {k: v.detach().clone() for k, v in student.state_dict().items()}
            start_error = _output_error(student, shadow, images[held])
        history: list[dict[str, Any]] = []
        if path is not None and path.exists():
            header = load_checkpoint(path, key=key or self.name, modules={"student": student}, optimizers={})
            done, elapsed = int(header["step"]), float(header["elapsed"])
            history = list(header.get("extra", {}).get("history", []))
        started = time.perf_counter() - elapsed
        with torch.no_grad():
            q_in, fp_in = images, images
            for b in range(done):  # inputs of the first block still to do
                q_in = _run_all(BlockRunner(student, blocks[b]), q_in, 256)
                fp_in = _run_all(BlockRunner(shadow, fp_blocks[b]), fp_in, 256)
        steps = self._steps_per_block(student, blocks)
        bar = progress_bar(total=sum(steps), desc="reconstruct", enabled=progress, initial=sum(steps[:done]))
        try:
            for b in range(done, len(blocks)):
                fp_out = _run_all(BlockRunner(shadow, fp_blocks[b]), fp_in, 256)
                g = torch.Generator().manual_seed(seed * 1_000_003 + b)  # per block: a resumed run draws the same
                record, q_in = self._reconstruct_block(student, blocks[b], ranges, q_in, fp_in, fp_out, train, held,
                                                       g, bar, steps[b])
                history.append(record)
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
        outcome: dict[str, Any] = {**start, "bn_mismatch": mismatch, "blocks": len(blocks), "block_mse": history,
                                   "blocks_kept": sum(1 for h in history if h.get("kept", True)),
                                   "steps_trained": sum(h.get("steps_run", h.get("steps", 0)) for h in history)}
        if calibrated is not None:
            end_error = _output_error(student, shadow, images[held])
            outcome.update(held_images=int(held.numel()), held_output_mse_before=start_error,
                           held_output_mse_after=end_error, returned="reconstructed")
            if not end_error < start_error:
                student.load_state_dict(calibrated)
                toolchain.student_eval(student)
                outcome["returned"] = "calibrated"
                warnings.warn(f"reconstruct did not lower the output error on {held.numel()} held-back images "
                              f"({start_error:.4g} -> {end_error:.4g}); the calibrated student is returned as it "
                              "came. More calibration images, or fewer steps, may let it help.", stacklevel=2)
        self.last_run = RunSummary(step=sum(steps[:done]), elapsed=time.perf_counter() - started, extra=outcome)
        return student

    def _unlike_training_data(self, teacher: Teacher, images: torch.Tensor) -> tuple[float | None, bool]:
        """The images' BN mismatch (``None`` without BatchNorm), and whether to refuse them.

        The held-back guard judges each block on calibration images too, so it cannot see what fitting
        images unlike the training data costs on real ones: on Gaussian noise, ResNet-56 W4A4 fell from
        79.83 to 60.84 and EfficientNet-Lite0 W4A8 from 71.30 to 38.30 with every block "improving"."""
        from ..synthesizers.bn_stats import bn_mismatch

        mismatch = bn_mismatch(teacher.model, images)
        if mismatch is None or mismatch <= self.bn_check:
            return None if mismatch is None else round(mismatch, 4), False
        warnings.warn(f"reconstruct: the calibration images are unlike the data the model was trained on (its "
                      f"BatchNorm statistics are off by {mismatch:.2f} running stds on average, against about 0.1 "
                      f"for real images; bn_check = {self.bn_check}). Fitting the blocks to them lowers accuracy "
                      "on real images, and the held-back check cannot see it, so no block is fitted: the "
                      "calibrated student is returned with its biases corrected only (with these images, "
                      "calibration alone, without reconstruct, scores higher). Use real images or a data-free "
                      "source (zeroq, genie), or set reconstruct.bn_check=0 to fit them anyway.", stacklevel=3)
        return round(mismatch, 4), True

    def _correct_start(self, teacher: Teacher, student: fx.GraphModule, shadow: nn.Module, toolchain: Any,
                       images: torch.Tensor, train: torch.Tensor, held: torch.Tensor | None) -> dict[str, Any]:
        """Bias-correct the trainable student before any block trains, as post-training does.

        A trainable student has no bias correction (in training mode its BNs absorb the shift), so in
        eval mode 4-bit weights shift every channel's mean: EfficientNet-Lite0 W4A8 starts at 7.6% top-1,
        68.4 once corrected, and the blocks' few hundred steps cannot move the BN betas that far. The
        correction is kept only if it lowers the output error on the held-back images."""
        layers = None if self.bias_correction == "off" else toolchain.student_bias_correction_layers(student)
        if not layers:
            return {"start_bias_corrected": 0}
        from ..quant.biascorrect import correct_biases

        before = {k: v.detach().clone() for k, v in student.state_dict().items()} if held is not None else None
        error = _output_error(student, shadow, images[held]) if held is not None else None
        changed = correct_biases(student, layers, CalibrationSet(images[train], batch_size=32),
                                 standardize_with=teacher.model if self.bias_correction == "bn" else None)
        if before is None:
            return {"start_bias_corrected": changed}
        after = _output_error(student, shadow, images[held])
        if not after < error:
            student.load_state_dict(before)
            changed = 0
        return {"start_bias_corrected": changed, "start_held_mse": [error, after]}

    def _steps_per_block(self, student: fx.GraphModule, blocks: list[Block]) -> list[int]:
        """``steps`` each, or (``steps_by_size``) scaled by sqrt(block weights / mean), within 0.5x..2x:
        the stem of ResNet-20 has 432 weights and its last stage's blocks 74k, one budget fits neither."""
        if not self.steps_by_size:
            return [self.steps] * len(blocks)
        sizes = [sum(p.numel() for p in block_parameters(student, b) if p.dim() > 1) for b in blocks]
        mean = max(sum(sizes) / len(sizes), 1.0)
        return [max(1, round(self.steps * min(2.0, max(0.5, (n / mean) ** 0.5)))) for n in sizes]

    def _split(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training and held-back image indices; no hold-out when either part would be under 8 images."""
        held = int(round(n * self.holdout))
        if held < 8 or n - held < 8:
            if self.holdout > 0:
                warnings.warn(f"reconstruct: {n} calibration images are too few to hold {self.holdout:.0%} back "
                              "(8 or more each side), so no update is checked on unseen images", stacklevel=3)
            return torch.arange(n), None
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + n))
        return order[held:].sort().values, order[:held].sort().values

    def _reconstruct_block(self, student: fx.GraphModule, block: Block, ranges: set[int], q_in: torch.Tensor,
                           fp_in: torch.Tensor, fp_out: torch.Tensor, train: torch.Tensor,
                           held: torch.Tensor | None, g: torch.Generator, bar: Any,
                           steps: int) -> tuple[dict[str, Any], torch.Tensor]:
        """Train one block; its record and its (kept) output on every calibration image."""
        runner = BlockRunner(student, block)
        params = [p for p in block_parameters(student, block) if p.is_floating_point()]
        steps_of = [p for p in params if id(p) in ranges]
        weights = [p for p in params if id(p) not in ranges]
        for p in params:
            p.requires_grad_(True)
        if self.weight_lr is None:
            groups = [{"params": weights, "lr": self.lr}]
        else:  # a movement in proportion to the tensor: ResNet-20's weights differ 10x in RMS between layers
            groups = [{"params": [p for p in weights if p.dim() <= 1], "lr": self.lr}]
            groups += [{"params": [p], "lr": self.weight_lr * max(float(p.detach().pow(2).mean().sqrt()), 1e-8)}
                       for p in weights if p.dim() > 1]
        for p in steps_of:  # Adam's step ignores the gradient's size: make it relative to the scale's
            groups.append({"params": [p], "lr": self.range_lr * max(float(p.detach().abs().mean()), 1e-8)})
        opt = torch.optim.Adam(groups, weight_decay=self.weight_decay)
        clampable = clampable_scales(student, {id(p) for p in steps_of})  # the others do not move here
        saved = _block_state(student, block) if held is not None else None
        record: dict[str, Any] = {"block": block.index, "steps": steps}
        with torch.no_grad():
            record.update(_errors(_run_all(runner, q_in, 256), fp_out, train, held, "before"))
        check = self.early_stop if held is not None else 0
        best = (record["held_before"], None) if check else None
        for step in range(steps):
            if check and step and step % check == 0:
                best, stop = self._check_progress(runner, student, block, q_in, fp_out, held, best)
                if stop:
                    bar.update(steps - step)
                    record["steps_run"] = step
                    break
            idx = train[torch.randint(0, train.numel(), (min(self.batch_size, train.numel()),), generator=g)]
            x = q_in[idx]
            if self.qdrop > 0:
                keep_fp = (torch.rand(x.shape, generator=g) < self.qdrop).to(x.device)
                x = torch.where(keep_fp, fp_in[idx], x)
            loss = F.mse_loss(runner(x), fp_out[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            clamp_scales(student, clampable)
            if step % 20 == 0:
                bar.set_postfix({"block": block.index, "mse": f"{loss.item():.3g}"}, refresh=False)
            bar.update(1)
        if best is not None and best[1] is not None and "steps_run" not in record:
            best, _ = self._check_progress(runner, student, block, q_in, fp_out, held, best, last=True)
        with torch.no_grad():
            q_out = _run_all(runner, q_in, 256)  # also the next block's input: one pass for both
            record.update(_errors(q_out, fp_out, train, held, "after"))
            if held is not None:
                record["kept"] = record["held_after"] < record["held_before"]
                if not record["kept"]:  # the update fitted the training images only: undo it
                    for tensor, value in saved:
                        tensor.copy_(value)
                    q_out = _run_all(runner, q_in, 256)
        return record, q_out


    @torch.no_grad()
    def _check_progress(self, runner: BlockRunner, student: fx.GraphModule, block: Block, q_in: torch.Tensor,
                        fp_out: torch.Tensor, held: torch.Tensor, best: tuple[float, Any],
                        last: bool = False) -> tuple[tuple[float, Any], bool]:
        """Early stop: the held-back error now against the best seen; on no 1% gain, the best is restored.

        A block already near its FP output (Lite0's late blocks) stops after a check or two, so the
        budget goes to the blocks that still learn."""
        error = float(F.mse_loss(runner(q_in[held]), fp_out[held]))
        if error < best[0] * 0.99:
            return (error, _block_state(student, block)), False
        if best[1] is not None and error > best[0]:
            for tensor, value in best[1]:
                tensor.copy_(value)
        return best, not last


def _errors(out: torch.Tensor, reference: torch.Tensor, train: torch.Tensor, held: torch.Tensor | None,
            when: str) -> dict[str, float]:
    errors = {f"mse_{when}": float(F.mse_loss(out[train], reference[train]))}
    if held is not None:
        errors[f"held_{when}"] = float(F.mse_loss(out[held], reference[held]))
    return errors


def _block_state(student: fx.GraphModule, block: Block) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every tensor a block's training can change (weights, step sizes, fake-quant buffers), copied."""
    from ..quant.blocks import owner_and_attr

    tensors: dict[int, torch.Tensor] = {}
    for target in block.modules:
        module = student.get_submodule(target)
        for t in [*module.parameters(), *module.buffers()]:
            tensors[id(t)] = t
    for target in block.attrs:
        t = getattr(*owner_and_attr(student, target))
        if torch.is_tensor(t):
            tensors[id(t)] = t
    return [(t, t.detach().clone()) for t in tensors.values()]


@torch.no_grad()
def _output_error(student: nn.Module, shadow: nn.Module, images: torch.Tensor) -> float:
    """Mean squared error of the student's outputs (logits) against the FP network's."""
    total, count = 0.0, 0
    for i in range(0, images.shape[0], 256):
        reference = shadow(images[i:i + 256])
        total += float(F.mse_loss(student(images[i:i + 256]), reference, reduction="sum"))
        count += reference.numel()
    return total / count


__all__ = ["ReconstructDistiller"]
