"""Which per-image descriptor can tell that the cheapest variant is enough? (issue 26, DynaDFQ's selector)

Builds (or loads from the cache) the variants ``dfq dynamic`` would, labels every image "the cheapest
variant agrees with FP" (the oracle's first choice) and fits a logistic regression on each candidate
descriptor. Two scores per descriptor, as the area under the ROC curve on the real test images:

- ``synthetic->real``: fitted on the selector's synthetic set (teacher's label), scored on real images;
  what a data-free selector can reach with that descriptor;
- ``real->real``: fitted on one half of the real test images, scored on the other; whether the
  descriptor carries the signal at all.

Precision of "cheapest" at the oracle's own rate is reported too, against the base rate.

    .venv/bin/python tools/selector_probe.py --toolchain torchao-pt2e --source zeroq --distill reconstruct \
        --steps 4:200,6:200,8:0 --json bench-out/selector-probe.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.nn import functional as F

from dfq_plugins import plugins
from dfq_plugins.api import make_toolchain, synthesize
from dfq_plugins.dynamic import oracle_choices
from dfq_plugins.dynamic.build import build_variants, parse_bits, parse_steps
from dfq_plugins.dynamic.selector import _pooled_stats as pooled
from dfq_plugins.dynamic.train import augmented_copies, batched
from dfq_plugins.io import atomic_write_text


def auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = score[positive], score[~positive]
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None]).float().mean()
    ties = (pos[:, None] == neg[None]).float().mean()
    return float(greater + 0.5 * ties)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, steps: int = 300, decay: float = 1e-3) -> tuple:
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, y.float()) + decay * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda q: ((q - mean) / std) @ w.detach() + b.detach()


def precision_at(score: torch.Tensor, positive: torch.Tensor, rate: float) -> float:
    """Precision of the top ``rate`` fraction by score."""
    k = max(1, round(rate * score.numel()))
    return float(positive[score.argsort(descending=True)[:k]].float().mean())


def logit_stats(logits: torch.Tensor) -> torch.Tensor:
    p = logits.float().softmax(-1)
    top2 = p.topk(2, -1).values
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return torch.stack([ent, top2[:, 0], top2[:, 0] - top2[:, 1]], 1)


def fit_softmax(x: torch.Tensor, target: torch.Tensor, classes: int, steps: int = 200) -> object:
    """A linear classifier from pooled features to the teacher's class: an early-exit head whose
    confidence can stand for the input's difficulty."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(((x - mean) / std) @ w + b, target) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda q: ((q - mean) / std) @ w.detach() + b.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar10-resnet20")
    parser.add_argument("--toolchain", default="torchao-pt2e")
    parser.add_argument("--bits", default="4,6,8")
    parser.add_argument("--source", default="zeroq")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--distill", default="reconstruct")
    parser.add_argument("--steps", default="4:200,6:200,8:0")
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--json", type=Path, default=Path("bench-out/selector-probe.json"))
    args = parser.parse_args()

    entry = plugins.get("models", args.model).obj
    model, spec = entry.load()
    model.eval()
    test = entry.test_set()
    images, labels = test.images, test.labels
    bits = parse_bits(args.bits)
    chain = make_toolchain(args.toolchain)
    train_set = synthesize(model, args.source, input_spec=spec, num_samples=args.images, seed=0, progress=False)
    select_set = synthesize(model, args.source, input_spec=spec, num_samples=args.images, seed=1, progress=False)
    variants = build_variants(model, spec, chain, train_set, bits, steps=parse_steps(args.steps, bits, 0),
                              distill=args.distill, progress=False)
    sel_images = augmented_copies(select_set.images.float(), args.copies, 1)

    def everything(x: torch.Tensor) -> dict[str, torch.Tensor]:
        fp = batched(model, x)
        cheap = batched(variants[0].deployed, x)
        feats: dict[str, torch.Tensor] = {}
        acts: dict[str, torch.Tensor] = {}
        hooks = [getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: acts.__setitem__(name, torch.cat([acts.get(name, o[:0]), o.detach()])))
            for name in ("relu", "layer1", "layer2", "layer3")]
        batched(model, x)
        for h in hooks:
            h.remove()
        feats["image pooled"] = pooled(F.adaptive_avg_pool2d(x, 16))
        feats["FP stem"] = pooled(acts["relu"])
        feats["FP layer1"] = pooled(acts["layer1"])
        feats["FP layer2"] = pooled(acts["layer2"])
        feats["FP layer3"] = pooled(acts["layer3"])
        feats["cheapest variant's logits (cascade)"] = logit_stats(cheap)
        feats["cheapest variant's entropy alone (the cascade's rule)"] = logit_stats(cheap)[:, :1]
        feats["cheapest variant's logits + pooled penultimate"] = torch.cat([logit_stats(cheap), cheap.float()], 1)
        feats["FP logits (not deployable)"] = logit_stats(fp)
        all_logits = torch.stack([batched(v.deployed, x) for v in variants])
        return {"feats": feats, "ok": oracle_choices(all_logits, fp.argmax(1)) == 0}

    real, syn = everything(images), everything(sel_images)
    teacher_syn = batched(model, sel_images).argmax(1)
    for layer in ("FP layer1", "FP layer2", "FP layer3"):
        head = fit_softmax(syn["feats"][layer], teacher_syn, 10)
        for d in (real, syn):
            d["feats"][f"{layer} -> linear head's logits"] = logit_stats(head(d["feats"][layer]))
    half = torch.Generator().manual_seed(0)
    perm = torch.randperm(images.shape[0], generator=half)
    a, b = perm[: len(perm) // 2], perm[len(perm) // 2:]
    base = float(real["ok"].float().mean())
    rows = []
    print(f"real: cheapest variant enough on {100 * base:.1f}% of {len(labels)} images; "
          f"synthetic: {100 * float(syn['ok'].float().mean()):.1f}% of {sel_images.shape[0]}")
    print("| descriptor | dims | AUC synthetic->real | precision@base | AUC real->real (half) |")
    print("|---|---|---|---|---|")
    for name in real["feats"]:
        xr, xs = real["feats"][name], syn["feats"][name]
        score_s = fit_logistic(xs, syn["ok"])(xr)
        score_r = fit_logistic(xr[a], real["ok"][a])(xr[b])
        row = {"descriptor": name, "dims": xr.shape[1], "auc_syn_to_real": auc(score_s, real["ok"]),
               "precision_at_base": precision_at(score_s, real["ok"], base),
               "auc_real_to_real": auc(score_r, real["ok"][b])}
        rows.append(row)
        print(f"| {name} | {row['dims']} | {row['auc_syn_to_real']:.3f} | {row['precision_at_base']:.3f} | "
              f"{row['auc_real_to_real']:.3f} |")
    record = {"config": vars(args) | {"json": str(args.json)}, "base_rate": base,
              "synthetic_rate": float(syn["ok"].float().mean()), "rows": rows,
              "fixed_top1": [float((batched(v.deployed, images).argmax(1) == labels).float().mean()) for v in variants]}
    atomic_write_text(args.json, json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
