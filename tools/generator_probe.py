"""How varied are an online distiller's generated images? Reads the generator from a loop's checkpoint.

For each class it draws 8 codes and reports the mean pixel distance between images of the same class
against images of different classes (a ratio near 1 is GDFQ-like variety, far below 1 means the code is
ignored), and how sure the teacher is of them. Used for Causal-DFQ's style collapse (docs/claims.md):

    .venv/bin/python tools/generator_probe.py \
        ~/.cache/dfq_plugins/distill/causal-*/checkpoint.safetensors=64 \
        ~/.cache/dfq_plugins/distill/gdfq-*/checkpoint.safetensors=0

``=N`` is the generator's style_dim (causal: 64; gdfq and adadfq: 0).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open

from dfq_plugins.api import resolve_model
from dfq_plugins.distillers.generator import ConditionalGenerator


def load_generator(path: Path, num_classes: int, shape: tuple[int, int, int], style_dim: int,
                   latent_dim: int, width: int) -> tuple[ConditionalGenerator, int]:
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("dfq_checkpoint", "{}"))
        prefix = "module.generator."
        state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    if not state:
        raise SystemExit(f"{path} holds no generator: pass the checkpoint of gdfq, adadfq or causal")
    gen = ConditionalGenerator(num_classes, shape, latent_dim, width, style_dim=style_dim)
    gen.load_state_dict(state)
    return gen.train(), int(meta.get("step", -1))  # the loops draw their images in train mode


@torch.no_grad()
def probe(gen: ConditionalGenerator, teacher: torch.nn.Module, num_classes: int, per_class: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = gen(torch.randn(len(y), gen.code_dim(), generator=g), y)
    p = teacher(x).softmax(1)
    d = torch.cdist(x.flatten(1), x.flatten(1))
    block = torch.block_diag(*[torch.ones(per_class, per_class)] * num_classes).bool()
    same, other = d[block & ~torch.eye(len(y)).bool()].mean(), d[~block].mean()
    return {"same_class_distance": float(same), "other_class_distance": float(other),
            "ratio": float(same / other), "teacher_max_prob": float(p.max(1).values.mean()),
            "teacher_entropy": float(-(p * (p + 1e-12).log()).sum(1).mean()),
            "teacher_agrees_with_label": float((p.argmax(1) == y).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="CHECKPOINT=STYLE_DIM")
    ap.add_argument("--model", default="cifar10-resnet20")
    ap.add_argument("--latent-dim", type=int, default=100)
    ap.add_argument("--width", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    teacher, spec = resolve_model(args.model, None)
    teacher.eval()
    for item in args.checkpoints:
        path, _, style = item.rpartition("=")
        if not path:
            raise SystemExit(f"{item!r}: write CHECKPOINT=STYLE_DIM (64 for causal, 0 for gdfq/adadfq)")
        gen, step = load_generator(Path(path), spec.num_classes, tuple(spec.shape), int(style),
                                   args.latent_dim, args.width)
        print(json.dumps({"checkpoint": path, "step": step, **probe(gen, teacher, spec.num_classes)}))


if __name__ == "__main__":
    main()
