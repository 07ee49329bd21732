"""The volume protocol's report: report.md with one table per mode, the figure of Dice against K (and against the
number of drawn slices) with every peer, and overlays of the first test study on three orthogonal planes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.intensity import overlay
from ..inference.volume import byte_volume

NAMES = {
    "registration": "multi-atlas registration (affine + demons, majority vote)",
    "registration_local": "multi-atlas registration, the same registrations with locally weighted voting",
    "ppg_fixed_supports": "PPG, fixed supports (the app's path before)",
    "ppg_position_supports": "PPG, supports at the slice's position",
    "ppg_registration_prompt": "PPG, registration prompt",
    "ppg_registration_prompt_tuned": "PPG, registration prompt, fine-tuned on the fly on the K studies",
    "unet3d": "MONAI 3D UNet trained on the K studies",
    "litemedsam_gt_box": "LiteMedSAM, ground-truth box on every slice (oracle)",
    "nearest_slice_copy": "nearest drawn slice copied",
    "interpolation": "shape-based interpolation (Fill between slices)",
    "slice_registration": "each slice registered onto the next from the drawn ones on both sides (2D demons, no model)",
    "ppg_drawn_fixed_supports": "PPG, the drawn slices as fixed supports",
    "ppg_propagation": "PPG propagation from the drawn slices",
}
PPG_STUDIES = (
    "ppg_fixed_supports",
    "ppg_position_supports",
    "ppg_registration_prompt",
    "ppg_registration_prompt_tuned",
)


def per_study(results: dict, mode: str) -> dict[str, dict[str, np.ndarray]]:
    """method -> key (K, n or "all") -> (studies, labels) Dice array, studies in results order."""
    labels = [v for k, v in sorted(results["labels"].items(), key=lambda kv: int(kv[0]))]
    out: dict[str, dict[str, list]] = {}
    for study in results["studies"].values():
        for method, keys in study[mode].items():
            for key, row in keys.items():
                out.setdefault(method, {}).setdefault(key, []).append([row[name] for name in labels])
    return {m: {k: np.array(v) for k, v in keys.items()} for m, keys in out.items()}


def seconds(results: dict, mode: str) -> dict[str, dict[str, float]]:
    """method -> key -> mean seconds per study."""
    out: dict[str, dict[str, list]] = {}
    for study in results["studies"].values():
        for method, keys in study[mode].items():
            for key, row in keys.items():
                out.setdefault(method, {}).setdefault(key, []).append(row["seconds"])
    return {m: {k: float(np.mean(v)) for k, v in keys.items()} for m, keys in out.items()}


def _table(scores: dict, times: dict, keys: list[str], head: str) -> list[str]:
    lines = ["| method | " + " | ".join(f"{head} = {k}" for k in keys) + " | s / study |",
             "|---|" + "---|" * (len(keys) + 1)]  # fmt: skip
    for method, by_key in scores.items():
        cells = []
        for k in keys:
            a = by_key.get(k, by_key.get("all"))
            cells.append("" if a is None else f"{a.mean():.3f} ± {a.mean(1).std():.3f}")
        t = times[method]
        lines.append(f"| {NAMES.get(method, method)} | " + " | ".join(cells) + f" | {np.mean(list(t.values())):.1f} |")
    return lines


def per_study_table(results: dict) -> list[str]:
    """3D Dice of each study (mean over labels): every studies-mode method at K = 5 (the largest K without it) beside
    registration, and every drawn-mode method at the most drawn slices."""
    k = ("5" if 5 in results["ks"] else str(results["ks"][-1])) if results["ks"] else None
    n = str(results["drawn"][-1]) if results["drawn"] else None
    studies, drawn = per_study(results, "studies"), per_study(results, "drawn")
    cols = [(m, by.get(k, by.get("all"))) for m, by in studies.items()]
    cols += [(m, by.get(n)) for m, by in drawn.items()] if n else []
    cols = [(m, a) for m, a in cols if a is not None]
    lines = [f"| study | {' | '.join(m + (f' (n = {n})' if m in drawn else '') for m, _ in cols)} |",
             "|---|" + "---|" * len(cols)]  # fmt: skip
    for r, sid in enumerate(results["studies"]):
        lines.append(f"| {sid} | " + " | ".join(f"{a[r].mean():.3f}" for _, a in cols) + " |")
    at = f"; K = {k}" if k else ""
    return [f"## Per study (3D Dice, mean over labels{at})", "", *lines, ""]


def targets(results: dict) -> list[str]:
    """The issue's targets, each met or missed, from the numbers."""
    out = []
    st, dr = per_study(results, "studies"), per_study(results, "drawn")
    if "5" in st.get("registration", {}):
        best = max(PPG_STUDIES, key=lambda m: st[m]["5"].mean() if "5" in st.get(m, {}) else -1)
        peer = max(("registration", "registration_local"), key=lambda m: st[m]["5"].mean() if m in st else -1)
        ppg, reg = st[best]["5"].mean(), st[peer]["5"].mean()
        met, floor = "met" if ppg >= reg else "missed", "met" if ppg >= 0.85 else "missed"
        out.append(f"- K = 5, best PPG route ({best}) {ppg:.3f} against the best registration ({peer}) {reg:.3f}: "
                   f"at or above it {met}; at least 0.85: {floor}.")  # fmt: skip
    if "3" in dr.get("ppg_propagation", {}):
        p = dr["ppg_propagation"]["3"].mean()
        i, c = dr["interpolation"]["3"].mean(), dr["nearest_slice_copy"]["3"].mean()
        out.append(f"- 3 drawn slices, propagation {p:.3f} against interpolation {i:.3f} and nearest copy {c:.3f}: "
                   f"above both {'met' if p > max(i, c) else 'missed'}; at least 0.85: "
                   f"{'met' if p >= 0.85 else 'missed'}.")  # fmt: skip
        if "3" in dr.get("slice_registration", {}):
            r = dr["slice_registration"]["3"].mean()
            out.append(f"- 3 drawn slices, slice-to-slice registration with no model {r:.3f}: the PPG's propagation "
                       f"is {'above' if p > r else 'below'} it.")  # fmt: skip
    return out


def figure(results: dict, path: Path) -> None:
    """Dice against K (labelled studies) with every peer, and against the number of drawn slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [(m, head) for m, head, key in (("studies", "labelled studies K", "ks"), ("drawn", "drawn slices n",
             "drawn")) if results[key]]  # fmt: skip
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False)
    for ax, (mode, head) in zip(axes[0], modes, strict=True):
        for method, by_key in per_study(results, mode).items():
            if "all" in by_key:
                ax.axhline(by_key["all"].mean(), ls="--", color="grey", label=NAMES.get(method, method))
                continue
            ks = sorted(by_key, key=int)
            ax.plot([int(k) for k in ks], [by_key[k].mean() for k in ks], marker="o", label=NAMES.get(method, method))
        ticks = results["ks"] if mode == "studies" else results["drawn"]
        if mode == "studies":
            ax.set_xscale("log")
        ax.set_xticks([int(k) for k in ticks], [str(k) for k in ticks])
        ax.set_xlabel(head)
        ax.set_ylabel("mean Dice over labels")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    n = len(results["studies"])
    fig.suptitle(f"{n} test {'study' if n == 1 else 'studies'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overlays(shown: dict, label_ids: list[int], path: Path) -> None:
    """The first test study: ground truth and every method, on the three planes through the object's centre."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, truth = byte_volume(shown["image"][None])[0], shown["truth"]
    centre = [int(c) for c in torch.nonzero(truth).float().mean(0).round()]
    rows = [("ground truth", truth)]
    rows += [(f"{NAMES.get(m, m)} (K = {shown['k']})", p) for m, p in shown["studies"].items()]
    rows += [(f"{NAMES.get(m, m)} (n = {shown['n']})", p) for m, p in shown["drawn"].items()]
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.4 * len(rows)))
    for r, (name, label) in enumerate(rows):
        for ax in range(3):
            cut = [slice(None)] * 3
            cut[ax] = centre[ax]
            masks = torch.stack([label[tuple(cut)] == i for i in label_ids])
            axes[r, ax].imshow(overlay(image[tuple(cut)][None].expand(3, -1, -1), masks).transpose(1, 0, 2))
            axes[r, ax].set_axis_off()
        axes[r, 0].set_title(name, fontsize=7, loc="left")
    fig.suptitle(f"{shown['study']}: planes through the object's centre {tuple(centre)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def section(results: dict, mode: str) -> list[str]:
    """The table of one mode ("studies" or "drawn"), or nothing when the run had no such mode."""
    keys = [str(k) for k in results["ks" if mode == "studies" else "drawn"]]
    if not keys:
        return []
    if mode == "studies":
        atlases = ", ".join(results["atlases"])
        head = ["## Labelled studies → a new study", "",
                f"Atlases (first K of a seeded order of the training split): {atlases}."]  # fmt: skip
    else:
        head = ["## Drawn slices of the study → the rest of it", "",
                "n slices spread over the object's extent; Dice on the slices not drawn."]  # fmt: skip
    table = _table(per_study(results, mode), seconds(results, mode), keys, "K" if mode == "studies" else "n")
    return [*head, "", *table, ""]


def write_volume_report(results: dict, out_dir: str | Path, *, note: str = "") -> Path:
    """report.md, dice_vs_k.png and overlays.png (from the run's overlays.pt) beside ``results.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure(results, out / "dice_vs_k.png")
    shown = out / "overlays.pt"
    if shown.is_file():
        overlays(torch.load(shown, weights_only=False), [int(k) for k in results["labels"]], out / "overlays.png")
    n = len(results["studies"])
    lines = [
        f"# Volume protocol: {out.name}",
        "",
        f"{n} test {'study' if n == 1 else 'studies'}, slices along axis {results['axis']}, labels "
        f"{', '.join(results['labels'].values())}. Mean Dice over the labels, ± the standard deviation over studies. "
        + note,
        "",
        *section(results, "studies"),
        *section(results, "drawn"),
        *per_study_table(results),
        "## Targets",
        "",
        *targets(results),
        "",
        "![Dice against K](dice_vs_k.png)",
        "",
    ]
    if shown.is_file():
        lines += ["![overlays](overlays.png)", ""]
    if results.get("unet_steps"):
        lines += [f"3D UNet training steps per K: {results['unet_steps']}.", ""]
    for k, t in results.get("registration_finetune", {}).items():
        lines += [
            f"Registration fine-tune, K = {k}: {t['episodes']} episodes over {t['slices']} slices, "
            f"{t['seconds']:.0f} s (registrations included), check loss {t['check_loss_before']:.3f} -> "
            f"{t['check_loss_after']:.3f}{'' if t['kept'] else ' (not kept: the base weights ran)'}.",
            "",
        ]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
