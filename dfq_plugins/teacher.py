"""The full-precision model seen as a teacher: its BN layers, classifier and hooks."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .errors import NonFiniteError
from .io import tensors_hash
from .spec import InputSpec

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# "bf16": the teacher's forward under bfloat16 autocast (a GPU speed knob; its logits come back in float32)
TEACHER_PRECISIONS = ("fp32", "bf16")


class Teacher:
    """A frozen FP model plus the introspection synthesizers and distillers need.

    The wrapped model is put in eval mode and its parameters stop requiring gradients (the
    teacher is never trained); gradients still flow to the inputs. Hooks are context
    managers and always remove themselves, even on error or Ctrl-C.
    """

    def __init__(self, model: nn.Module, spec: InputSpec) -> None:
        check_model_values(model)
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.spec = spec
        self._fingerprint: str | None = None
        self._precision = "fp32"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._precision == "fp32":
            return self.model(x)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            out = self.model(x)
        return out.float()

    @contextlib.contextmanager
    def precision(self, name: str) -> Iterator[None]:
        """Run the teacher's forward at ``name`` inside the block ("bf16": bfloat16 autocast, which
        tensor cores run several times faster than float32; the default "fp32" leaves it untouched)."""
        from .config import ConfigError

        if name not in TEACHER_PRECISIONS:
            raise ConfigError(f"teacher_precision={name!r}; choose one of {TEACHER_PRECISIONS}")
        before, self._precision = self._precision, name
        try:
            yield
        finally:
            self._precision = before

    @property
    def device(self) -> torch.device:
        """Where the teacher's weights are, so where synthesis and distillation compute."""
        from .device import module_device

        return module_device(self.model)

    def bn_layers(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, _BN_TYPES)]

    def has_batchnorm(self) -> bool:
        return bool(self.bn_layers())

    def classifier(self) -> nn.Linear:
        """The last Linear layer: its weight rows are the class prototypes."""
        linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("the teacher has no nn.Linear classifier layer")
        return linears[-1]

    def fingerprint(self) -> str:
        """A content hash of the weights and buffers, the teacher's part of every cache key."""
        if self._fingerprint is None:
            self._fingerprint = tensors_hash(self.model.state_dict())[:16]
        return self._fingerprint

    @contextlib.contextmanager
    def forward_pre_hooks(
        self, modules: list[nn.Module], fn: Callable[[int, torch.Tensor], None]
    ) -> Iterator[None]:
        """Call ``fn(index, input)`` before each of ``modules`` runs; removed on exit."""
        handles = [
            m.register_forward_pre_hook(lambda _m, args, i=i: fn(i, args[0])) for i, m in enumerate(modules)
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def penultimate_features(self, store: list[torch.Tensor]) -> Iterator[None]:
        """Append the classifier's input (pooled features) to ``store`` on each forward."""
        with self.forward_pre_hooks([self.classifier()], lambda _i, x: store.append(x.float())):
            yield


def check_model_values(model: nn.Module) -> None:
    """Refuse a model whose weights or BatchNorm statistics cannot give finite outputs.

    Synthesis matches the BN statistics, so a NaN mean or a negative variance (a damaged
    checkpoint) turns every synthesized image into NaN; name the first bad tensor instead.
    """
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and t.device.type != "meta" and not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).nonzero()[0].tolist()
            raise NonFiniteError(f"the model's {name!r} holds a non-finite value at index {bad} "
                                 f"({t[tuple(bad)].item()}); the checkpoint is damaged or was not loaded right")
    for name, m in model.named_modules():
        var = getattr(m, "running_var", None) if isinstance(m, _BN_TYPES) else None
        if var is not None and var.device.type != "meta" and (var < 0).any():
            channel = int((var < 0).nonzero()[0, 0])
            raise NonFiniteError(f"BatchNorm {name!r} has a negative running_var at channel {channel} "
                                 f"({var[channel].item():g}): a variance cannot be negative, and synthesis matching "
                                 "it gives NaN images; the checkpoint is damaged or was not loaded right")


def check_finite(what: str, t: torch.Tensor, hint: str = "") -> None:
    """Raise NonFiniteError naming ``what`` when ``t`` holds NaN or infinity."""
    if t.is_floating_point() and not torch.isfinite(t).all():
        n = int((~torch.isfinite(t)).sum())
        raise NonFiniteError(f"{what}: {n} of {t.numel()} values are NaN or infinite{'; ' + hint if hint else ''}")


@contextlib.contextmanager
def borrowed_teacher(model: nn.Module, spec: InputSpec) -> Iterator[Teacher]:
    """A Teacher over a user's model that gives the model back as it was (mode, requires_grad)."""
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield Teacher(model, spec)
    finally:
        model.train(training)
        for p, flag in flags:
            p.requires_grad_(flag)

