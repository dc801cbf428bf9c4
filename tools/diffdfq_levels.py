"""What DiffDFQ's progressive selection sees at a bit-width (issue 26, DiffDFQ at 2 and 3 bits).

The ``diffdfq`` distiller starts at the level T that minimises D(T) = ||z_P(x_T) - z_Q(x_T)||_F over
the stored diffusion levels, then only moves toward clean images. This prints, for every level of
the cached ``diffdfq`` set and a freshly calibrated student: D, the teacher logits' norm, D relative
to it, the student's agreement with the teacher and the teacher's confidence. Where the student
agrees with the teacher at chance, D only tracks how much the noise shrinks the teacher's logits,
so the selection goes to the noisiest level whatever it is trained on next.

    .venv/bin/python tools/diffdfq_levels.py --scheme w2a4 --json bench-out/diffdfq-levels-w2a4.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dfq_plugins import api
from dfq_plugins.diffusion import DiffusionLevels
from dfq_plugins.io import atomic_write_text


def level_table(model: str, scheme: str, toolchain: str, images: int, seed: int) -> list[dict[str, float]]:
    net, spec = api.resolve_model(model, None)
    net.eval()
    cs = api.synthesize(net, input_spec=spec, source={"name": "diffdfq", "qaware_scheme": scheme},
                        num_samples=images, seed=seed, progress=False)
    student = api.quantize(net, input_spec=spec, toolchain=toolchain, source=cs, scheme=f"{scheme}-wmse-ahist",
                           trainable=True, progress=False)
    levels = DiffusionLevels.of(cs)
    rows = []
    with torch.no_grad():
        for t in range(len(levels)):
            x = levels.images(t)
            z_p, z_q = net(x), student(x)
            d, norm = float(torch.linalg.matrix_norm(z_p - z_q)), float(torch.linalg.matrix_norm(z_p))
            rows.append({"level": t, "noise_std": round(levels.noise_std(t), 4), "D": round(d, 2),
                         "teacher_norm": round(norm, 2), "D_relative": round(d / norm, 4),
                         "agreement": round(float((z_p.argmax(1) == z_q.argmax(1)).float().mean()), 4),
                         "teacher_confidence": round(float(z_p.softmax(1).amax(1).mean()), 4)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cifar10-resnet20")
    ap.add_argument("--scheme", default="w2a4")
    ap.add_argument("--toolchain", default="torchao-pt2e")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rows = level_table(a.model, a.scheme, a.toolchain, a.images, a.seed)
    for r in rows:
        print(f"level {r['level']:2d}  noise std {r['noise_std']:.3f}  D {r['D']:8.1f}  |z_P| {r['teacher_norm']:8.1f}  "
              f"D/|z_P| {r['D_relative']:.3f}  agreement {r['agreement']:.3f}  teacher conf {r['teacher_confidence']:.3f}")
    if a.json:
        record = {"model": a.model, "scheme": a.scheme, "toolchain": a.toolchain, "images": a.images,
                  "seed": a.seed, "torch": torch.__version__, "levels": rows}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(a.json, json.dumps(record, indent=1))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
