"""`bench profile`: the configurations to time, and the table printed at the end."""
from __future__ import annotations

import json
import shutil
import sys

from bench.core.errors import UserError
from bench.experiment.config import ablation_names, compose_config
from bench.tools.profile.profiler import INPUTS, OFFLINE, VARIANTS, Config, Profiler


def parse_methods(text: str) -> list[tuple[str, str]]:
    """`clip,mmclip:no-attmim` -> [(method, ablation)]; `all` = clip, mrm, and mmclip and mlip with every
    ablation of theirs."""
    if text == "all":
        return [("clip", "none"), ("mrm", "none"),
                *((m, a) for m in ("mmclip", "mlip") for a in ablation_names(m))]
    out = []
    for spec in filter(None, (s.strip() for s in text.split(","))):
        method, _, ablation = spec.partition(":")
        out.append((method, ablation or "none"))
    if not out:
        raise UserError("--methods names no method")
    return out


def configurations(methods: list[tuple[str, str]], presets: list[str], inputs: list[str]) -> list[Config]:
    bad = [i for i in inputs if i not in INPUTS]
    if bad:
        raise UserError(f"--inputs must be among {', '.join(INPUTS)}, got {', '.join(bad)}")
    return [Config(m, a, p, i) for p in presets for m, a in methods for i in inputs]


# --- the device's limit --------------------------------------------------------------------------------------


def cost_vs_clip(rows: list[dict]) -> list[float | None]:
    """Each row's step time over plain CLIP's of the same preset, input and variant (None: CLIP not timed)."""
    clip = {(r["preset"], r["input"], r["variant"]): r["step_ms"] for r in rows
            if r["method"] == "clip" and r["ablation"] == "none" and "error" not in r}
    return [None if "error" in r or (r["preset"], r["input"], r["variant"]) not in clip
            else r["step_ms"] / clip[(r["preset"], r["input"], r["variant"])] for r in rows]


def render(rows: list[dict]) -> str:
    """A table of the lines, for people; `vs clip` is the step's cost relative to CLIP's (`cost_vs_clip`)."""
    head = (f"{'configuration':<40} {'variant':<8} {'ms/step':>9} {'vs clip':>8} {'img/s':>8} {'peak MB':>9} "
            f"{'MFU':>6} {'loader':>8}")
    lines = [head]
    for r, relative in zip(rows, cost_vs_clip(rows)):
        name = Config(r["method"], r["ablation"], r["preset"], r["input"]).label
        if "error" in r:
            lines.append(f"{name:<40} {r['variant']:<8} {r['error']}")
            continue
        mfu = "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        peak = "" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        ratio = "" if r.get("loader_ratio") is None else f"{r['loader_ratio']:.1f}x"
        vs_clip = "" if relative is None else f"{relative:.2f}x"
        lines.append(f"{name:<40} {r['variant']:<8} {r['step_ms']:>9.1f} {vs_clip:>8} {r['images_per_s']:>8.0f} "
                     f"{peak:>9} {mfu:>6} {ratio:>8}")
    return "\n".join(lines)


def main(args) -> None:
    from bench.experiment.setup import start

    device, _ = start(compose_config("clip", "none", 0, [*OFFLINE, *args.overrides]).runtime)
    presets = [p for p in (args.presets or ("base" if device.type == "cuda" else "tiny")).split(",") if p]
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise UserError(f"--variants must be among {', '.join(VARIANTS)}, got {args.variants!r}")
    overrides = list(args.overrides)
    if args.batch_size:
        overrides.append(f"trainer.batch_size={args.batch_size}")
    configs = configurations(parse_methods(args.methods), presets, [i for i in args.inputs.split(",") if i])
    profiler = Profiler(device, args.steps, args.warmup, args.loader_batches, args.workers)
    out = open(args.out, "a") if args.out else None
    rows = []
    try:
        for config in configs:
            for row in profiler.run(config, variants, overrides):
                rows.append(row)
                line = json.dumps(row)
                print(line, flush=True)
                if out is not None:
                    out.write(line + "\n")
                    out.flush()
    finally:
        if out is not None:
            out.close()
        shutil.rmtree(profiler.workdir, ignore_errors=True)
    print(render(rows), file=sys.stderr)
